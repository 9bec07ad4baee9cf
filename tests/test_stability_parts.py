"""`scoring.stability.Stability` as reported: its JSON fields and the warnings' layer lists (mutation survivors
of issue #22 over scoring/; the computations are held to hand computations in test_score_stability.py)."""

from __future__ import annotations

import pytest

from moe_prune.scoring.stability import TIE_RTOL, LayerStability, Stability


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
