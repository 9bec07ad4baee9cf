"""Gradient statistics of the routed experts (MC-Suite 2.5), reduced once from a whole run's gradient.

While `expert_gradients` is active only the parameters of the MoE layers' experts modules require
gradients (the model stays in eval mode; no optimizer). The caller runs forward and backward passes
of the SUMMED next-token loss; the gradients add up in `.grad`, and `reduce` scales them by
1 / predictions, i.e. the gradient of the mean next-token NLL over the whole calibration set, which
does not depend on how the data was batched. Per MoE layer, for each expert e:

  F_e            the concatenation of expert e's gradient over every parameter of the experts module,
                 flattened (fused parameters have the expert axis leading; a [E*I, H] layout such as
                 DBRX's is expert-major and reshapes to [E, -1]).
  grad_gram      [E, E] F F^T (norm = sqrt(diagonal), cosine similarity = gram / norm norm^T).
  grad_entropy   [E] sum over hidden dimensions of log std of the gradient: for each 2-D per-expert
                 gradient matrix, the axis whose length is the hidden size is the hidden axis (the
                 last when both are), the (population) std is taken across the other axis; 1-D biases
                 and matrices with no hidden-sized axis are skipped; summed over matrices. -inf when
                 some hidden dimension has zero spread (e.g. an expert that received no token).
  grad_outliers  [E] elements of F_e beyond mean +- 3 std (population) of F_e's own elements.

These are nonlinear in the whole run's gradient, so files do not combine (rule `final` in
`artifacts.stats`). Reductions run in float64, one parameter at a time (one pass for moments, one for outliers).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from moe_prune.architectures.config import ModelConfig

OUTLIER_STDS = 3.0
GRADIENT_FIELDS = ("grad_gram", "grad_entropy", "grad_outliers")  # what `reduce` returns


def expert_parameters(model: Any, config: ModelConfig) -> list[list[torch.nn.Parameter]]:
    """The experts module's parameters of every MoE layer (in `config.moe_layers` order)."""
    adapter = config.adapter
    return [
        list(model.get_submodule(f"{adapter.runtime_layers}.{layer}.{adapter.runtime_experts}").parameters())
        for layer in config.moe_layers
    ]


@contextmanager
def expert_gradients(model: Any, config: ModelConfig) -> Iterator[list[list[torch.nn.Parameter]]]:
    """Only expert parameters require gradients (starting from zero); every flag and .grad restored after."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    experts = expert_parameters(model, config)
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for layer in experts:
            for p in layer:
                p.requires_grad_(True)
        yield experts
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
            p.grad = None


def per_expert(tensor: torch.Tensor, experts: int) -> torch.Tensor:
    """[E, ...] view of a fused expert tensor: leading expert axis, or expert-major rows ([E*I, H] -> [E, I, H])."""
    if tensor.dim() == 0 or tensor.shape[0] % experts:
        raise ValueError(f"expert parameter of shape {tuple(tensor.shape)} has no leading axis of {experts} experts")
    if tensor.shape[0] == experts:
        return tensor
    return tensor.reshape(experts, tensor.shape[0] // experts, *tensor.shape[1:])


def log_std_sum(grad: torch.Tensor, hidden_size: int) -> torch.Tensor | None:
    """[E]: sum over the hidden axis of log std across the other axis; None for 1-D (bias) gradients."""
    if grad.dim() != 3:
        return None
    rows, cols = grad.shape[1:]
    if hidden_size not in (rows, cols):
        return None
    hidden_axis = 2 if cols == hidden_size else 1
    std = grad.std(dim=3 - hidden_axis, correction=0)
    return std.log().sum(dim=1)


def reduce(
    layers: list[list[torch.nn.Parameter]], experts: int, hidden_size: int, predictions: int
) -> dict[str, np.ndarray]:
    """grad_gram [L, E, E], grad_entropy [L, E], grad_outliers [L, E] of the accumulated `.grad`s."""
    scale = 1.0 / max(predictions, 1)
    grams, entropies, outliers = [], [], []
    for params in layers:
        grads = [_grad(p, experts, scale) for p in params]
        gram = sum(g @ g.T for g in (x.reshape(experts, -1) for x in grads))
        entropy = torch.zeros(experts, dtype=torch.float64)
        for g in grads:
            part = log_std_sum(g, hidden_size)
            if part is not None:
                entropy += part.cpu()
        flats = [g.reshape(experts, -1) for g in grads]
        count = sum(f.shape[1] for f in flats)
        mean = sum(f.sum(1) for f in flats) / count
        # Variance from the sum of squares (float64, mean ~ 0 next to the spread): no (g - mean) temporaries.
        sumsq = sum(torch.linalg.vector_norm(f, dim=1).square() for f in flats)
        std = (sumsq / count - mean.square()).clamp_min(0).sqrt()
        lower, upper = (mean - OUTLIER_STDS * std)[:, None], (mean + OUTLIER_STDS * std)[:, None]
        beyond = sum(((f < lower) | (f > upper)).sum(1) for f in flats)
        grams.append(gram.cpu())
        entropies.append(entropy)
        outliers.append(beyond.cpu())
    return {
        "grad_gram": torch.stack(grams).numpy(),
        "grad_entropy": torch.stack(entropies).numpy(),
        "grad_outliers": torch.stack(outliers).to(torch.int64).numpy(),
    }


def _grad(param: torch.nn.Parameter, experts: int, scale: float) -> torch.Tensor:
    """[E, ...] float64 accumulated gradient (zeros when nothing reached the parameter)."""
    grad = param.grad if param.grad is not None else torch.zeros_like(param)
    return per_expert(grad.detach().double() * scale, experts)
