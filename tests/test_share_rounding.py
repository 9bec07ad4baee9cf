"""`--data` shares to whole tokens (runtime/sources.py): largest remainder, checked against a brute force.

Among whole-token splits adding up to the budget, with every source at the floor or ceiling of its exact share,
largest remainder is the one closest to the exact shares (least squared error); ties go to the earlier source.
"""

from __future__ import annotations

import itertools
import random
from fractions import Fraction

from moe_prune.runtime.sources import allocate, parse_sources


def closest_split(shares: list[Fraction], budget: int) -> list[int]:
    """Brute force: every floor/ceiling choice adding up to `budget`, the least squared error first."""
    exact = [s * budget for s in shares]
    floors = [int(x) for x in exact]
    best: tuple[Fraction, list[int]] | None = None
    for ups in itertools.product((0, 1), repeat=len(shares)):
        split = [f + u for f, u in zip(floors, ups, strict=True)]
        if sum(split) != budget:
            continue
        error = sum((n - x) ** 2 for n, x in zip(split, exact, strict=True))
        if best is None or error < best[0] or (error == best[0] and split > best[1]):  # tie: earlier source
            best = (error, split)
    assert best is not None
    return best[1]


def test_shares_round_to_the_split_closest_to_exact():
    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, 1000), rng.randint(1, 4)))
        shares = [Fraction(b - a, 1000) for a, b in zip([0, *cuts], [*cuts, 1000], strict=True)]
        specs = parse_sources([f"s{i}.jsonl:{float(s)}" for i, s in enumerate(shares)])
        budget = rng.randint(1, 5000)
        assert allocate(specs, budget) == closest_split(shares, budget), (shares, budget)
