"""Turn scores into drops: how many (drop / keep / ratio), layer-wise or global, with floors and routing groups.

Ties are broken by expert slot (lower slot first for both directions; pairs by (p, q)), so the
same scores always give the same mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from moe_prune.errors import MoePruneError
from moe_prune.scoring.registry import Direction


@dataclass(frozen=True)
class Budget:
    """Exactly one of: drop N, keep N, or drop a ratio R. Per layer, or over all layers with `--global`."""

    drop: int | None = None
    keep: int | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("drop", "keep", "ratio") if getattr(self, name) is not None]
        if len(given) != 1:
            raise MoePruneError("give exactly one of --drop N, --keep N or --ratio R")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise MoePruneError(f"--ratio {self.ratio} must be in [0, 1)")
        for name in ("drop", "keep"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise MoePruneError(f"--{name} {value} must not be negative")

    def drops(self, experts: int, scope: str) -> int:
        """How many of `experts` to drop; `ratio` rounds to the nearest count (halves up)."""
        if self.drop is not None:
            n, option = self.drop, f"--drop {self.drop}"
        elif self.keep is not None:
            n, option = experts - self.keep, f"--keep {self.keep}"
            if n < 0:
                raise MoePruneError(f"--keep {self.keep} is more than the {experts} experts {scope}")
        else:
            assert self.ratio is not None
            n, option = math.floor(self.ratio * experts + 0.5), f"--ratio {self.ratio}"
        if n >= experts:
            raise MoePruneError(
                f"{option}: dropping {n} of the {experts} experts {scope} leaves none; keep at least one"
            )
        return n

    def to_dict(self) -> dict[str, float | int | None]:
        return {"drop": self.drop, "keep": self.keep, "ratio": self.ratio}


def expert_order(scores: np.ndarray, direction: Direction) -> list[int]:
    """Slots in drop order: lowest score first for `min`, highest first for `max`; ties by slot."""
    key = scores if direction == "min" else -scores
    return [int(i) for i in np.lexsort((np.arange(len(scores)), key))]


def pick_by_order(order: list[int], n_drop: int, allowed: Callable[[int, list[int]], bool]) -> list[int]:
    """The first `n_drop` slots of `order` that `allowed(slot, dropped so far)` accepts."""
    dropped: list[int] = []
    for slot in order:
        if len(dropped) == n_drop:
            break
        if allowed(slot, dropped):
            dropped.append(slot)
    return dropped


def pick_by_pairs(
    values: np.ndarray,
    usage: np.ndarray,
    direction: Direction,
    n_drop: int,
    allowed: Callable[[int, list[int]], bool],
) -> tuple[list[int], list[tuple[int, int, float]]]:
    """Greedy pair rule: among remaining experts take the pair with min/max value, drop its less used expert.

    Ties in usage drop the higher slot; ties in value take the first pair (p, q) in row order. Pairs whose
    loser is not allowed (routing-group quota) are skipped. Returns the drops and the pairs (p, q, value) chosen.
    """
    experts = len(usage)
    p_idx, q_idx = np.triu_indices(experts, k=1)
    p_less = (usage[p_idx] < usage[q_idx]) | ((usage[p_idx] == usage[q_idx]) & (p_idx > q_idx))
    loser = np.where(p_less, p_idx, q_idx)
    pair_values = values[p_idx, q_idx].astype(np.float64)
    fill = np.inf if direction == "min" else -np.inf
    dropped: list[int] = []
    pairs: list[tuple[int, int, float]] = []
    while len(dropped) < n_drop:
        droppable = np.array([allowed(slot, dropped) and slot not in dropped for slot in range(experts)], dtype=bool)
        ok = droppable[loser] & ~np.isin(p_idx, dropped) & ~np.isin(q_idx, dropped)
        if not ok.any():
            break
        masked = np.where(ok, pair_values, fill)
        best = int(np.argmin(masked) if direction == "min" else np.argmax(masked))
        dropped.append(int(loser[best]))
        pairs.append((int(p_idx[best]), int(q_idx[best]), float(pair_values[best])))
    return dropped, pairs


def group_quota(experts: int, n_group: int, n_drop: int, layer: int) -> Callable[[int, list[int]], bool]:
    """Allow a slot while its routing group has dropped fewer than n_drop / n_group (equal drops per group)."""
    if n_group <= 1:
        return lambda slot, dropped: True
    size = experts // n_group
    if experts % n_group or n_drop % n_group:
        raise MoePruneError(
            f"layer {layer}: grouped routing ({n_group} groups of {size}) needs the drop count to be a multiple of "
            f"{n_group}; dropping {n_drop} is not"
        )
    if size - n_drop // n_group < 2:
        raise MoePruneError(
            f"layer {layer}: dropping {n_drop} leaves {size - n_drop // n_group} experts per routing group; "
            "grouped routing needs at least 2 per group"
        )
    quota = n_drop // n_group
    return lambda slot, dropped: sum(1 for d in dropped if d // size == slot // size) < quota


def global_drops(
    scores: np.ndarray,
    direction: Direction,
    total: int,
    floor: int,
    counts: list[int] | None = None,
    protected: set[tuple[int, int]] | frozenset[tuple[int, int]] = frozenset(),
) -> list[list[int]]:
    """Drop `total` experts over all layers in score order, never leaving a layer with fewer than `floor`.

    `counts[l]` is layer l's number of experts (default: every slot); slots beyond it and `protected`
    (layer, slot) pairs are never dropped.
    """
    layers, experts = scores.shape
    counts = counts or [experts] * layers
    kept = [sum(1 for p in protected if p[0] == i and p[1] < n) for i, n in enumerate(counts)]  # real slots only
    room = sum(max(n - max(floor, k), 0) for n, k in zip(counts, kept, strict=True))
    if total > room:
        raise MoePruneError(
            f"cannot drop {total} experts globally while keeping at least {floor} per layer (at most {room} can go)"
        )
    flat = scores.reshape(-1)
    key = flat if direction == "min" else -flat
    order = np.lexsort((np.arange(flat.size), key))
    dropped: list[list[int]] = [[] for _ in range(layers)]
    done = 0
    for index in order:
        if done == total:
            break
        layer, slot = divmod(int(index), experts)
        if slot < counts[layer] and (layer, slot) not in protected and counts[layer] - len(dropped[layer]) > floor:
            dropped[layer].append(slot)
            done += 1
    return dropped


Quota = Callable[[int, list[int]], bool]


@dataclass(frozen=True)
class Selection:
    """One run's rule from scores to drops, kept whole so resampled statistics are judged by the same rule.

    Per layer (`n_drops`, routing-group `quotas`) or, when `n_drops` is None, global (`total`, `floor`);
    `protected` (MoE layer index, slot) pairs are never dropped.
    """

    direction: Direction
    layers: tuple[int, ...]  # MoE layer numbers, for messages
    counts: tuple[int, ...]  # experts per layer (a ragged model's differ)
    n_drops: tuple[int, ...] | None = None
    quotas: tuple[Quota, ...] = ()
    total: int = 0
    floor: int = 1
    protected: frozenset[tuple[int, int]] = field(default_factory=frozenset)

    def drops(
        self, scores: np.ndarray, usage: np.ndarray | None, values: np.ndarray | None
    ) -> tuple[list[list[int]], list[list[tuple[int, int, float]]]]:
        """Slots to drop per layer (in choice order) and, for pair criteria, the (p, q, value) slot pairs chosen."""
        if self.n_drops is None:
            chosen = global_drops(scores, self.direction, self.total, self.floor, list(self.counts), self.protected)
            return chosen, [[] for _ in self.layers]
        drops: list[list[int]] = []
        pairs: list[list[tuple[int, int, float]]] = []
        for index, (layer, n, n_drop) in enumerate(zip(self.layers, self.counts, self.n_drops, strict=True)):
            allowed = self.allowed(index)
            chosen_pairs: list[tuple[int, int, float]] = []
            if values is not None:
                assert usage is not None
                layer_values, layer_usage = values[index][:n, :n], usage[index][:n]
                chosen, chosen_pairs = pick_by_pairs(layer_values, layer_usage, self.direction, n_drop, allowed)
            else:
                chosen = pick_by_order(expert_order(scores[index][:n], self.direction), n_drop, allowed)
            if len(chosen) < n_drop:
                raise MoePruneError(
                    f"layer {layer}: only {len(chosen)} of the {n_drop} experts to drop may go (the others are "
                    "protected super experts or routing-group quotas); drop fewer or leave out --protect-super-experts"
                )
            drops.append(chosen)
            pairs.append(chosen_pairs)
        return drops, pairs

    def allowed(self, index: int) -> Quota:
        """Layer `index`'s routing-group quota, and never a protected slot."""
        quota = self.quotas[index]
        return lambda slot, dropped: (index, slot) not in self.protected and quota(slot, dropped)
