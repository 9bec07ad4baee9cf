"""`scoring.stability.Stability` as reported: its JSON fields and the warnings' layer lists (mutation survivors
of issue #22 over scoring/; the computations are held to hand computations in test_score_stability.py)."""

from __future__ import annotations

import numpy as np
import pytest

from moe_prune.artifacts.identity import ModelIdentity
from moe_prune.artifacts.stats import Stats
from moe_prune.scoring.selection import Budget
from moe_prune.scoring.stability import TIE_RTOL, LayerStability, Stability
from moe_prune.stages.score import score

IDENT = ModelIdentity("mixtral", 2, {0: tuple(range(4)), 1: tuple(range(4))}, "sha256:synthetic")


def test_to_dict_records_how_the_bootstrap_was_drawn():
    stability = Stability({0: LayerStability(0.5, False, False)}, ["a.npz", "b.npz"], 200, 7, "bootstrap over 2")
    assert stability.to_dict() == {"parts": ["a.npz", "b.npz"], "draws": 200, "seed": 7, "note": "bootstrap over 2"}


@pytest.mark.parametrize(("tied", "named"), [([3], "layer 3"), ([1, 3], "layers 1, 3")])
def test_warnings_name_every_layer_in_the_right_number(tied, named):
    layers = {i: LayerStability(0.0, i in tied, i in tied) for i in range(4)}
    constant, tie = Stability(layers).warnings("usage-frequency")
    assert constant == (
        f"criterion 'usage-frequency': scores are nearly constant (spread within {TIE_RTOL:g} of the largest) in "
        f"{named}; which experts go there is decided by expert index, not by the data"
    )
    assert tie == (
        "criterion 'usage-frequency': the last dropped and the first kept expert score the same in "
        f"{named}; that cut is decided by expert index"
    )


def co_selection_report(layers: list[np.ndarray], drop: int):
    """`score` with co-selection on two layers of 4 experts (usage 40, 30, 20, 10), `drop` per layer."""
    hard = np.array([40, 30, 20, 10], dtype=np.int64)
    co = np.stack([m.astype(np.int64) for m in layers])
    for matrix in co:
        np.fill_diagonal(matrix, hard)
    stats = Stats(IDENT, {"coselection": co, "hard_counts": np.stack([hard, hard])}, {"top_k": 1})
    return score(stats, None, "co-selection", budget=Budget(drop=drop))[1]


def symmetric(upper: dict[tuple[int, int], int]) -> np.ndarray:
    matrix = np.zeros((4, 4), dtype=np.int64)
    for (p, q), value in upper.items():
        matrix[p, q] = matrix[q, p] = value
    return matrix


def test_pair_cut_flags_a_near_tie_and_a_constant_layer():
    """Layer 0: the next pair (2, 3) is 1 in 10^7 below the chosen (0, 1): a tie, margin 1 / spread. Layer 1:
    every pair alike: constant, not a tie, margin 0."""
    big = 10_000_000
    tie = symmetric({(0, 1): big, (0, 2): 2, (0, 3): 4, (1, 2): 7, (1, 3): 3, (2, 3): big - 1})
    flat = symmetric({pair: 5 for pair in [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]})
    layers = co_selection_report([tie, flat], drop=1).stability.layers
    assert (layers[0].constant, layers[0].tie) == (False, True)
    assert layers[0].margin == pytest.approx(1 / (big - 2))
    assert (layers[1].constant, layers[1].tie, layers[1].margin) == (True, False, 0.0)


def test_pair_margin_is_taken_at_the_last_chosen_pair():
    """Drop 2: pairs (0, 1) = 9 then (2, 3) = 6 are chosen (experts 1 and 3 go); the next would be (0, 2) = 5."""
    matrix = symmetric({(0, 1): 9, (0, 2): 5, (0, 3): 1, (1, 2): 2, (1, 3): 3, (2, 3): 6})
    report = co_selection_report([matrix, matrix], drop=2)
    assert report.dropped[0] == [1, 3]
    assert report.stability.layers[0].margin == pytest.approx((6 - 5) / (9 - 1))
