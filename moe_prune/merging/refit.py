"""`merge --refit`: each kept slot's down projection fitted by least squares to the WHOLE layer's output.

Weight averaging needs experts that are close in weight space; independently trained experts are not
(on the demo it loses to plain pruning at a quarter of the experts). Output merging instead keeps each
slot's anchor as it is up to its down projection D (gate/up and router row unchanged) and chooses D so
the slot alone reproduces what the original layer outputs, weighted by how likely the original router
was to send each token to the anchor:

    D_a = argmin_D  sum_x p_a(x) || D h_a(x) - y(x) ||^2,   i.e.   D_a^T = (sum p h h^T)^-1 sum p h y^T

with h_a the anchor's intermediate activation, y the gate-weighted mean of the outputs of the experts the
original layer chose for the token, and p_a the router probability. The original layer outputs y times
the token's gate sum, and so does the smaller one if every slot reproduces y, whichever slots a token
picks, for routers whose gates sum to a fixed value (renormalised top-k, with or without a scaling factor
such as DeepSeek-V3's); the dropped experts' function is merged into the kept ones in output space.
The sums come from `profile --refit-stats` (`runtime.expert_outputs`, every expert of every layer stored),
or, without them, from one sequential pass that sums, solves and frees one layer at a time
(`merging.refit_pass`); no gradient step and no labels are involved (closed form, like the layer-wise
reconstruction of GPTQ or the output merging of MergeMoE, Miao et al. 2025).

Ridge: D^T = (hh + lambda s I)^-1 hy with s the mean diagonal of hh. The default lambda = 1e-6 only keeps the
solve defined when an intermediate neuron never fired. `--refit-ridge auto` chooses lambda from `RIDGES` by
the error on held-out calibration windows (standard ridge selection by validation error, e.g. Hastie,
Tibshirani and Friedman, ESL 7.2/7.10): with hh = Q diag(L) Q^T (`eigen_fit`) every candidate is
Q diag(1/(L + lambda s)) Q^T hy, so the candidates cost one eigendecomposition per slot and the held-out
error sum_x p ||D h - y||^2 is computed from rotated activations (`candidate_errors`), in the memory of
the sums they replace.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from moe_prune.architectures.spec import ExpertTensor
from moe_prune.errors import MoePruneError

RIDGE = 1e-6  # times the mean diagonal of sum p h h^T
RIDGES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # the candidates of --refit-ridge auto
DOWN_SUFFIXES = ("down_proj", "down_proj.weight", "w2.weight", "output_linear.weight")


def _gram(hh: np.ndarray) -> tuple[np.ndarray, float]:
    """hh symmetrised in float64 and its mean diagonal s (the ridge's unit)."""
    gram = np.asarray(hh, dtype=np.float64)
    gram = gram + gram.T  # then halved and the ridge added in place: one I x I copy of the sums (memory)
    gram *= 0.5
    scale = float(np.mean(np.diag(gram))) if gram.size else 0.0
    if not np.isfinite(scale) or scale <= 0:
        raise MoePruneError("--refit: the expert never produced an activation on the calibration data")
    return gram, scale


def least_squares_down(hh: np.ndarray, hy: np.ndarray, ridge: float = RIDGE) -> np.ndarray:
    """[I, H] D^T solving (hh + ridge s) D^T = hy in float64; hh = sum p h h^T [I, I], hy = sum p h y^T [I, H]."""
    gram, scale = _gram(hh)
    gram[np.diag_indices_from(gram)] += ridge * scale
    return np.linalg.solve(gram, np.asarray(hy, dtype=np.float64))


def eigen_fit(hh: torch.Tensor, hy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(Q [I, I], L [I], Q^T hy [I, H], s) with hh = Q diag(L) Q^T: every ridge's solution from one decomposition."""
    gram = (hh.double() + hh.double().T) / 2
    scale = float(torch.diagonal(gram).mean()) if gram.numel() else 0.0
    if not np.isfinite(scale) or scale <= 0:
        raise MoePruneError("--refit: the expert never produced an activation on the calibration data")
    values, q = torch.linalg.eigh(gram)
    return q, values.clamp_min(0.0), q.T @ hy.double(), scale


def ridge_solution(q: torch.Tensor, values: torch.Tensor, rotated: torch.Tensor, scale: float, ridge: float):
    """[I, H] D^T = Q diag(1 / (L + ridge s)) Q^T hy, as a float64 numpy array."""
    return (q @ (rotated / (values + ridge * scale)[:, None])).cpu().numpy()


def candidate_errors(
    g: torch.Tensor, p: torch.Tensor, y: torch.Tensor, values: torch.Tensor, rotated: torch.Tensor, scale: float
) -> torch.Tensor:
    """[len(RIDGES)] sum_x p ||D_lambda^T h - y||^2 on held-out rows; g = h Q [T, I] (rotated activations)."""
    errors = torch.empty(len(RIDGES), dtype=torch.float64)
    for i, ridge in enumerate(RIDGES):
        residual = (g / (values + ridge * scale)) @ rotated - y
        errors[i] = (p[:, 0] * residual.square().sum(1)).sum().cpu()
    return errors


def is_down(layout: ExpertTensor) -> bool:
    return layout.suffix in DOWN_SUFFIXES


def check_layer(
    layouts: Mapping[str, ExpertTensor], shapes: Mapping[str, tuple[int, ...]], down_t: np.ndarray, where: str
) -> None:
    """One layer's expert tensors (`shapes`: one expert's shape per key) can take a refit down projection."""
    check_layouts(layouts, where)
    for key, layout in layouts.items():
        if is_down(layout):
            check_shape(down_t, layout, shapes[key], where)


def check_layouts(layouts: Mapping[str, ExpertTensor], where: str) -> None:
    """The refit writes one down projection per slot: refuse biases and layouts without a known down tensor."""
    biased = sorted(key for key, layout in layouts.items() if layout.axis is None or "bias" in layout.suffix)
    if biased:
        raise MoePruneError(f"{where}: --refit fits the down projection without a bias; these experts have {biased}")
    if not any(is_down(layout) for layout in layouts.values()):
        raise MoePruneError(
            f"{where}: --refit does not know which expert tensor is the down projection "
            f"(known: {', '.join(DOWN_SUFFIXES)})"
        )


def down_tensor(down_t: np.ndarray, layout: ExpertTensor) -> torch.Tensor:
    """D^T [I, H] in the stored orientation of one expert's down tensor (intermediate axis `layout.axis`)."""
    return torch.from_numpy(np.ascontiguousarray(down_t if layout.axis == 0 else down_t.T)).float()


def check_shape(down_t: np.ndarray, layout: ExpertTensor, shape: tuple[int, ...], where: str) -> None:
    """The fitted down projection has the shape of the stored one (statistics of this model's experts)."""
    got = tuple(down_tensor(down_t, layout).shape)
    if got != tuple(shape):
        raise MoePruneError(
            f"{where}: --refit statistics fit a down projection of shape {got}; {layout.suffix} is {tuple(shape)}"
        )
