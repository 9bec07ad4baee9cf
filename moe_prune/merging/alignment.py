"""Permutation alignment of one expert's intermediate neurons to another's (weight matching, Git Re-Basin).

An expert is F(x) = down(act(gate x) * up x): permuting its intermediate neurons (gate and up rows
and down columns together, plus per-neuron biases) leaves F unchanged. Before averaging, each
member is permuted so that its neurons line up with the anchor's: the permutation maximising
sum_n <member features of neuron P(n), anchor features of neuron n>, a linear assignment problem
solved exactly with the Hungarian algorithm (scipy.optimize.linear_sum_assignment).

An expert here is a dict {tensor key: one expert's tensor}; `layouts` maps the same keys to the
adapter's `ExpertTensor` rows, which say where the intermediate axis lies in each tensor.
"""

from __future__ import annotations

import numpy as np
import torch

from moe_prune.architectures.spec import ExpertTensor

Expert = dict[str, torch.Tensor]


def neuron_view(tensor: torch.Tensor, layout: ExpertTensor) -> torch.Tensor:
    """[I, parts, ...]: the tensor with one row per intermediate neuron (gate and up parts side by side)."""
    assert layout.axis is not None
    moved = tensor.movedim(layout.axis, 0)
    parts = layout.parts
    neurons = moved.shape[0] // parts
    if layout.interleaved:
        return moved.reshape(neurons, parts, *moved.shape[1:])
    return moved.reshape(parts, neurons, *moved.shape[1:]).transpose(0, 1)


def from_neuron_view(view: torch.Tensor, layout: ExpertTensor) -> torch.Tensor:
    """The inverse of `neuron_view`."""
    assert layout.axis is not None
    neurons, parts = view.shape[:2]
    if layout.interleaved:
        moved = view.reshape(neurons * parts, *view.shape[2:])
    else:
        moved = view.transpose(0, 1).reshape(neurons * parts, *view.shape[2:])
    return moved.movedim(0, layout.axis)


def neuron_features(expert: Expert, layouts: dict[str, ExpertTensor]) -> torch.Tensor:
    """[I, F]: for each intermediate neuron, its gate row, up row, down column (and biases) concatenated."""
    views = [neuron_view(t.float(), layouts[k]) for k, t in sorted(expert.items()) if layouts[k].axis is not None]
    return torch.cat([view.reshape(view.shape[0], -1) for view in views], dim=1)


def match_neurons(member: Expert, anchor: Expert, layouts: dict[str, ExpertTensor]) -> np.ndarray:
    """perm such that neuron n of the aligned member is neuron perm[n] of `member` (best match to anchor's n)."""
    from scipy.optimize import linear_sum_assignment

    ours = neuron_features(member, layouts).double().numpy()
    theirs = neuron_features(anchor, layouts).double().numpy()
    if ours.shape != theirs.shape:
        raise ValueError(f"experts differ in shape: {ours.shape} vs {theirs.shape}")
    cost = ours @ theirs.T
    np.negative(cost, out=cost)  # maximise as a minimum of -cost, negated in place: maximize=True negates into a
    rows, cols = linear_sum_assignment(cost)  # second I x I float64 (33 MB at I = 2048; merge's memory contract)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[cols] = rows
    return perm


def permute(expert: Expert, perm: np.ndarray, layouts: dict[str, ExpertTensor]) -> Expert:
    """The expert with its intermediate neurons reordered by `perm` (tensors without that axis unchanged)."""
    index = torch.as_tensor(perm, dtype=torch.long)
    out = {}
    for key, tensor in expert.items():
        layout = layouts[key]
        out[key] = tensor if layout.axis is None else from_neuron_view(neuron_view(tensor, layout)[index], layout)
    return out


def align(member: Expert, anchor: Expert, layouts: dict[str, ExpertTensor]) -> Expert:
    """`member` permuted to line up with `anchor` (PermutationAlign of UNCURL Algorithm 1, line 13)."""
    return permute(member, match_neurons(member, anchor, layouts), layouts)
