"""Inference-guided criteria (MC-Suite section 2.3) and SEER heavy-hitter counting: router statistics only."""

from __future__ import annotations

import numpy as np

from moe_prune.scoring.linalg import popcount
from moe_prune.scoring.registry import Inputs, criterion


def _per_token(inputs: Inputs, name: str) -> np.ndarray:
    """`name [L, E]` divided by the tokens each layer saw, so layers are comparable (SEER global pruning)."""
    tokens = inputs.array("tokens")[:, None]
    return np.divide(inputs.array(name), tokens, out=np.zeros_like(inputs.array(name)), where=tokens > 0)


@criterion(
    "usage-frequency",
    "fraction of tokens that select the expert in their top-k (SEER hard counts)",
    stats=("hard_counts", "tokens"),
    global_ok=True,
    source="MC-Suite EUF, eq. 7; SEER-MoE hard counting, eq. 5",
)
def usage_frequency(inputs: Inputs) -> np.ndarray:
    """score_p = hard_counts[p] / tokens: the Monte-Carlo estimate of P(expert p is in a token's top-k)."""
    return _per_token(inputs, "hard_counts")


@criterion(
    "soft-counts",
    "mean router probability of the expert over tokens (SEER soft counts)",
    stats=("soft_counts", "tokens"),
    global_ok=True,
    source="SEER-MoE soft counting, eq. 6",
)
def soft_counts(inputs: Inputs) -> np.ndarray:
    """score_p = sum over tokens of softmax(router logits)[p] / tokens (sigmoid scores for sigmoid routers)."""
    return _per_token(inputs, "soft_counts")


@criterion(
    "co-selection",
    "pair selected together by the most tokens; drop its less used expert",
    kind="pair",
    direction="max",
    stats=("coselection", "hard_counts"),
    source="MC-Suite ECC, eq. 8 (direction unreported; max as for token-overlap)",
)
def co_selection(inputs: Inputs) -> tuple[np.ndarray, np.ndarray]:
    """value(p, q) = tokens whose top-k holds both p and q; the pair's less used expert (hard counts) is dropped."""
    return inputs.array("coselection"), inputs.array("hard_counts")


@criterion(
    "vocabulary-coverage",
    "fraction of the vocabulary whose tokens were routed to the expert (dropping high coverage hurts)",
    stats=("vocab_bits",),
    source="MC-Suite EVTC, eq. 9",
)
def vocabulary_coverage(inputs: Inputs) -> np.ndarray:
    """score_p = |distinct input token ids routed to p| / |V| (|V| from config.json, else 8 x bitset bytes)."""
    assert inputs.stats is not None
    bits = inputs.stats.arrays["vocab_bits"]
    vocab = inputs.vocab_size or bits.shape[-1] * 8
    return popcount(bits).astype(np.float64) / vocab


@criterion(
    "token-overlap",
    "pair of experts sharing the most distinct input tokens; drop its less used expert (paper: max best)",
    kind="pair",
    direction="max",
    stats=("vocab_bits", "hard_counts"),
    source="MC-Suite ETS, eq. 10; Table 1 uses max",
)
def token_overlap(inputs: Inputs) -> tuple[np.ndarray, np.ndarray]:
    """value(p, q) = |distinct token ids routed to both p and q| (popcount of the AND of their bitsets)."""
    assert inputs.stats is not None
    bits = inputs.stats.arrays["vocab_bits"]
    layers, experts = bits.shape[:2]
    overlap = np.zeros((layers, experts, experts))
    for p in range(experts):
        overlap[:, p, :] = popcount(bits[:, p : p + 1, :] & bits)
    return overlap, inputs.array("hard_counts")


@criterion(
    "random",
    "seeded uniform random scores: the baseline every criterion should beat (--seed)",
    global_ok=True,
    source="MC-Suite Table 1 random dropping",
)
def random(inputs: Inputs) -> np.ndarray:
    """score_p ~ U(0, 1) from numpy's default_rng(seed): the same seed always drops the same experts."""
    return np.random.default_rng(inputs.seed).random(inputs.shape)
