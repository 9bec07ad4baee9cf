"""Search per-layer expert counts under one budget: the better of two starts, then seeded exchange moves.

A candidate is a count of kept experts per layer. It is feasible when every layer keeps between its
floor and its experts, in steps of its routing groups (grouped routers keep the same number per group),
and Σ count × cost stays within the budget (cost: 1 per expert, or an expert's bytes). A move takes one
step of experts from one layer and gives one step to another (or, while the budget has room, only gives).
The search is iterated first-improvement hill climbing: from the best start, the current candidate's moves
are tried in an order drawn from `seed` and the first that raises the objective is taken; at a candidate
none of whose moves helps, a kick of `KICK` random moves from the best so far starts another climb, which
replaces the best only if it ends higher. It stops after `max_evals` evaluations (starts included) or
when `PATIENCE` kicks in a row found nothing new to evaluate. Values are cached, so no candidate is
evaluated twice.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from moe_prune.errors import MoePruneError

Counts = tuple[int, ...]
KICK = 2
PATIENCE = 20


@dataclass(frozen=True)
class Space:
    """What each layer may keep and what the whole may cost."""

    experts: tuple[int, ...]  # per layer
    floors: tuple[int, ...]  # fewest kept per layer (a skipped layer: all of its experts)
    steps: tuple[int, ...]  # counts move by this (routing groups per layer; 1 without groups)
    costs: tuple[int, ...]  # cost of one kept expert per layer
    budget: int  # Σ count × cost must not exceed it

    def __post_init__(self) -> None:
        lowest = self.cost(self.floors)
        if lowest > self.budget:
            raise MoePruneError(
                f"the budget allows {self.budget:,} but keeping the fewest experts each layer may keep "
                f"({', '.join(map(str, self.floors))}) already needs {lowest:,}"
            )

    def cost(self, counts: Sequence[int]) -> int:
        return sum(c * k for c, k in zip(self.costs, counts, strict=True))

    def feasible(self, counts: Sequence[int]) -> bool:
        return self.cost(counts) <= self.budget and all(
            f <= k <= e and k % s == 0 for f, k, e, s in zip(self.floors, counts, self.experts, self.steps, strict=True)
        )

    def moves(self, counts: Counts) -> list[Counts]:
        """Every feasible neighbour: one step from a layer to another, or one step added while there is room."""
        found: list[Counts] = []
        n = len(counts)
        for give in [None, *range(n)]:
            for take in range(n):
                if take == give:
                    continue
                new = list(counts)
                new[take] += self.steps[take]
                if give is not None:
                    new[give] -= self.steps[give]
                if self.feasible(new):
                    found.append(tuple(new))
        return found


@dataclass
class Trace:
    """The search's record: starts, the result, and how many evaluations it spent."""

    starts: dict[str, tuple[Counts, float]]
    best: Counts
    value: float
    evaluations: int
    accepted: int = 0
    history: list[float] = field(default_factory=list)  # objective after each accepted move


def search(
    space: Space,
    starts: dict[str, Counts],
    objective: Callable[[Counts], float],
    max_evals: int,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> Trace:
    """Maximise `objective` over `space` from the best of `starts` (name -> counts, each feasible)."""
    if max_evals < len(starts):
        raise MoePruneError(f"--budget-evals {max_evals} is fewer than the {len(starts)} starting points to score")
    cache: dict[Counts, float] = {}
    report = progress or (lambda done, total: None)

    def value(counts: Counts) -> float:
        if counts not in cache:
            cache[counts] = objective(counts)
            report(len(cache), max_evals)
        return cache[counts]

    for name, counts in starts.items():
        assert space.feasible(counts), (name, counts, space)
    scored = {name: (counts, value(counts)) for name, counts in starts.items()}
    best, best_value = max(scored.values(), key=lambda item: item[1])
    trace = Trace(scored, best, best_value, 0)
    rng = random.Random(seed)
    stale = 0
    current, current_value = best, best_value
    while len(cache) < max_evals and stale < PATIENCE:
        before = len(cache)
        current, current_value = _climb(space, current, current_value, value, cache, max_evals, rng)
        if current_value > best_value:
            best, best_value = current, current_value
            trace.accepted += 1
            trace.history.append(best_value)
        stale = stale + 1 if len(cache) == before else 0
        current = _kick(space, best, rng)
        current_value = value(current) if len(cache) < max_evals or current in cache else -float("inf")
    trace.best, trace.value, trace.evaluations = best, best_value, len(cache)
    report(max_evals, max_evals)
    return trace


def _climb(
    space: Space,
    counts: Counts,
    current: float,
    value: Callable[[Counts], float],
    cache: dict[Counts, float],
    max_evals: int,
    rng: random.Random,
) -> tuple[Counts, float]:
    """First-improvement hill climbing from `counts` until no move helps or the evaluations run out."""
    improved = True
    while improved:
        improved = False
        neighbours = space.moves(counts)
        rng.shuffle(neighbours)
        for candidate in neighbours:
            if len(cache) >= max_evals and candidate not in cache:
                return counts, current
            if value(candidate) > current:
                counts, current, improved = candidate, cache[candidate], True
                break
    return counts, current


def _kick(space: Space, counts: Counts, rng: random.Random) -> Counts:
    """`KICK` random moves from `counts` (fewer where a candidate has no move)."""
    for _ in range(KICK):
        moves = space.moves(counts)
        if not moves:
            break
        counts = rng.choice(moves)
    return counts
