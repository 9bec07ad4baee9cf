"""How many experts each round drops, and how many tokens each round finetunes on.

Target: after k rounds, S x E of the ORIGINAL E experts of every MoE layer are gone. The drops are
spread as evenly as whole experts allow (D = S x E): every round drops floor(D / k) or one more, and
the first D mod k rounds take the extra one (an undamaged model is the safest to cut deepest).
The token budget doubles every round from the first (paper appendix C: 0.2M tokens in round 1,
then 0.4M, 0.8M, ...).
"""

from __future__ import annotations

import math

from moe_prune.errors import MoePruneError

RATIO_TOLERANCE = 1e-9


def total_drops(experts: int, ratio: float) -> int:
    """D = ratio x experts, refused unless it is a whole number of experts."""
    if not 0.0 < ratio < 1.0:
        raise MoePruneError(f"--target-ratio {ratio} must be between 0 and 1 (exclusive)")
    exact = ratio * experts
    drops = round(exact)
    if abs(exact - drops) > RATIO_TOLERANCE * experts or drops == 0:
        lower, upper = math.floor(exact), math.ceil(exact)
        options = " or ".join(f"{n / experts:g}" for n in (lower, upper) if 0 < n < experts)
        raise MoePruneError(
            f"--target-ratio {ratio} of {experts} experts per layer is {exact:g} experts, not a whole number; "
            f"use {options}"
        )
    return drops


def drop_schedule(experts: int, top_k: int, ratio: float, rounds: int | None) -> list[int]:
    """Experts dropped per layer in each round; `rounds=None` drops one per layer per round (the paper)."""
    drops = total_drops(experts, ratio)
    if experts - drops < top_k:
        raise MoePruneError(
            f"--target-ratio {ratio} keeps {experts - drops} of {experts} experts per layer, fewer than top-k {top_k}"
        )
    rounds = drops if rounds is None else rounds
    if rounds < 1:
        raise MoePruneError(f"--rounds must be at least 1 (got {rounds})")
    if rounds > drops:
        raise MoePruneError(
            f"--target-ratio {ratio} drops {drops} experts per layer, which {rounds} rounds cannot share with whole "
            f"experts (each round drops at least one); use --rounds {drops} or fewer"
        )
    base, extra = divmod(drops, rounds)
    return [base + 1] * extra + [base] * (rounds - extra)


def token_schedule(first: int, rounds: int) -> list[int]:
    """Finetuning tokens per round: `first`, then doubling."""
    if first < 1:
        raise MoePruneError(f"--tokens-first must be at least 1 (got {first})")
    return [first * 2**r for r in range(rounds)]
