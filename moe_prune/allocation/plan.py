"""From a budget and the criterion's scores to the search space, its starts and each count's drops.

The order inside a layer is the criterion's: a layer keeping k experts drops what `score` would drop
there with a per-layer budget of n − k (same selection rule, ties and routing-group quotas).
`--ratio` / `--keep` / `--drop` count the searched layers' experts together (layers left out with
`--skip-layers` keep all of theirs, outside the budget); `--bytes` bounds the routed experts' bytes plus
everything else in the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np

from moe_prune.allocation.search import Counts, Space
from moe_prune.errors import MoePruneError
from moe_prune.scoring.registry import Direction
from moe_prune.scoring.selection import Budget, Selection, global_drops, group_quota


@dataclass(frozen=True)
class Layers:
    """Per MoE layer: its number, experts, top-k, and whether the search may change it."""

    numbers: tuple[int, ...]
    experts: tuple[int, ...]
    top_k: tuple[int, ...]
    searched: tuple[bool, ...]
    n_group: int = 1


def space(layers: Layers, min_per_layer: int | None, costs: tuple[int, ...], budget: Budget | int) -> Space:
    """The feasible counts: floors (top-k, --min-per-layer, 2 per routing group), group steps, the budget."""
    if min_per_layer is not None and min_per_layer < 1:
        raise MoePruneError(f"--min-per-layer {min_per_layer} must be at least 1")
    step = layers.n_group
    floors = []
    for number, n, k, searched in zip(layers.numbers, layers.experts, layers.top_k, layers.searched, strict=True):
        if min_per_layer is not None and min_per_layer < k:
            raise MoePruneError(f"--min-per-layer {min_per_layer} is below layer {number}'s top-k {k}")
        floor = max(k, min_per_layer or 1, 2 * step if step > 1 else 1)
        floor = math.ceil(floor / step) * step
        if searched and floor > n:
            raise MoePruneError(f"layer {number} has {n} experts, fewer than the {floor} it must keep")
        floors.append(floor if searched else n)
    if isinstance(budget, Budget):
        fixed = sum(c * n for c, n, s in zip(costs, layers.experts, layers.searched, strict=True) if not s)
        total = sum(n for n, s in zip(layers.experts, layers.searched, strict=True) if s)
        limit = fixed + total - budget.drops(total, "in the searched MoE layers together")
    else:
        limit = budget
    return Space(layers.experts, tuple(floors), (step,) * len(floors), costs, limit)


def repair(space: Space, counts: list[int]) -> Counts:
    """`counts` rounded down to group steps, raised to the floors, then lowered (largest first) into the budget."""
    counts = [
        max(f, min(n, k // s * s)) for f, n, k, s in zip(space.floors, space.experts, counts, space.steps, strict=True)
    ]
    while space.cost(counts) > space.budget:
        room = [k - f for k, f in zip(counts, space.floors, strict=True)]
        index = max(range(len(counts)), key=lambda i: (room[i] > 0, counts[i] * space.costs[i]))
        counts[index] -= space.steps[index]
    return tuple(counts)


def uniform(space: Space, layers: Layers, budget: Budget | int) -> Counts:
    """`score`'s layer-wise counts for a ratio; otherwise the same share of every searched layer."""
    if isinstance(budget, Budget) and budget.ratio is not None:
        counts = [
            n - budget.drops(n, "per layer") if s else n for n, s in zip(layers.experts, layers.searched, strict=True)
        ]
    else:
        fixed = sum(c * n for c, n, s in zip(space.costs, layers.experts, layers.searched, strict=True) if not s)
        full = sum(c * n for c, n, s in zip(space.costs, layers.experts, layers.searched, strict=True) if s)
        share = (space.budget - fixed) / full if full else 1.0
        counts = [math.floor(n * share) if s else n for n, s in zip(layers.experts, layers.searched, strict=True)]
    return repair(space, counts)


def global_counts(space: Space, layers: Layers, scores: np.ndarray, direction: Direction) -> Counts:
    """Counts of one ranking over all searched layers (SEER's global selection), the fewest drops that fit."""
    rows = [i for i, s in enumerate(layers.searched) if s]
    floor = min(space.floors[i] for i in rows)
    sub = scores[rows]
    experts = [layers.experts[i] for i in rows]
    for total in range(sum(experts) - floor * len(rows) + 1):
        try:
            drops = global_drops(sub, direction, total, floor, experts)
        except MoePruneError:
            break
        counts = list(layers.experts)
        for i, dropped in zip(rows, drops, strict=True):
            counts[i] -= len(dropped)
        if space.cost(counts) <= space.budget:
            return repair(space, counts)
    return repair(space, [0] * len(layers.experts))


class DropTable:
    """Which slots a layer drops to keep k experts: the criterion's selection, computed once per (layer, k)."""

    def __init__(
        self,
        layers: Layers,
        direction: Direction,
        scores: np.ndarray,
        usage: np.ndarray | None,
        values: np.ndarray | None,
    ) -> None:
        self.layers, self.direction = layers, direction
        self.scores, self.usage, self.values = scores, usage, values
        self.slots = cache(self._slots)

    def _slots(self, index: int, keep: int) -> tuple[int, ...]:
        number, n = self.layers.numbers[index], self.layers.experts[index]
        quota = group_quota(n, self.layers.n_group, n - keep, number)
        rule = Selection(self.direction, (number,), (n,), (n - keep,), (quota,))
        row = slice(index, index + 1)
        usage = None if self.usage is None else self.usage[row]
        values = None if self.values is None else self.values[row]
        return tuple(rule.drops(self.scores[row], usage, values)[0][0])

    def drops(self, counts: Counts) -> list[list[int]]:
        return [list(self.slots(i, k)) for i, k in enumerate(counts)]
