"""Weighted averaging of aligned experts (UNCURL Algorithm 1, line 16), in float32."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from moe_prune.merging.alignment import Expert


def weighted_average(experts: Iterable[Expert], weights: Sequence[float]) -> Expert:
    """sum_i w_i * expert_i per tensor; weights are normalised to sum to 1.

    `experts` may be a generator: each member is added as it comes and can be freed before the next is made,
    so a cluster of many experts holds the sum and one member, never all of them (merge's memory contract)."""
    if not weights:
        raise ValueError("need one weight per expert and at least one expert")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    members = iter(experts)
    out: Expert = {}
    for weight in weights:
        expert = next(members, None)
        if expert is None:
            raise ValueError("need one weight per expert and at least one expert")
        for key, tensor in expert.items():
            if key not in out:
                out[key] = torch.zeros_like(tensor, dtype=torch.float32)
            out[key] += tensor.float() * (weight / total)
    if next(members, None) is not None:
        raise ValueError("need one weight per expert and at least one expert")
    return out
