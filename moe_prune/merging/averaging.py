"""Weighted averaging of aligned experts (UNCURL Algorithm 1, line 16), in float32."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moe_prune.merging.alignment import Expert


def weighted_average(experts: Sequence[Expert], weights: Sequence[float]) -> Expert:
    """sum_i w_i * expert_i per tensor; weights are normalised to sum to 1."""
    if not experts or len(experts) != len(weights):
        raise ValueError("need one weight per expert and at least one expert")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    out = {}
    for key in experts[0]:
        acc = torch.zeros_like(experts[0][key], dtype=torch.float32)
        for expert, weight in zip(experts, weights, strict=True):
            acc += expert[key].float() * (weight / total)
        out[key] = acc
    return out
