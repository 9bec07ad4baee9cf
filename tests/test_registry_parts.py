"""Scoring helpers the criteria tests pass over (mutation survivors of issue #22 over scoring/): ragged padding,
per-token normalisation of a layer that saw no tokens, the stability note, the NaN check of a ragged model."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from moe_prune.artifacts.identity import ModelIdentity
from moe_prune.artifacts.stats import Stats
from moe_prune.errors import MoePruneError
from moe_prune.scoring.registry import Criterion, Inputs, evaluate, get_criterion, stack_layers
from moe_prune.scoring.stability import stability_note

IDENT = ModelIdentity("mixtral", 2, {0: (0, 1, 2), 1: (0, 1, 2)}, "sha256:synthetic")


def test_smaller_layers_are_zero_padded_to_every_slot():
    rows = [np.arange(1.0, 5.0), np.arange(1.0, 3.0), np.arange(1.0, 4.0)]
    want = np.zeros((3, 4))
    for layer, row in enumerate(rows):
        want[layer, : len(row)] = row
    np.testing.assert_array_equal(stack_layers(rows, 4), want)
    pairs = [np.ones((4, 4)), np.ones((2, 2))]  # pair scores [E_l, E_l] pad both axes
    got = stack_layers(pairs, 4)
    assert got.shape == (2, 4, 4) and got[1].sum() == 4 and got[1, :2, :2].sum() == 4


def test_a_layer_that_saw_no_tokens_scores_zero_not_nan():
    counts = np.array([[0.0, 0.0, 0.0], [3.0, 6.0, 1.0]])
    inputs = Inputs(IDENT, Stats(IDENT, {"hard_counts": counts, "tokens": np.array([0, 10])}, {"top_k": 2}), None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a division by zero tokens would warn
        got = get_criterion("usage-frequency").fn(inputs)
    np.testing.assert_array_equal(got, [[0.0, 0.0, 0.0], [0.3, 0.6, 0.1]])


def test_the_stability_note_says_what_the_columns_can_show():
    parts = [Stats(IDENT, {}, {}), Stats(IDENT, {}, {})]
    assert stability_note(get_criterion("random"), parts).startswith("scores do not depend on calibration data")
    assert stability_note(get_criterion("usage-frequency"), []).startswith("margin only; --stability PART.npz")
    assert stability_note(get_criterion("usage-frequency"), parts) == "bootstrap over 2 disjoint partial profiles"


RAGGED = ModelIdentity("mixtral", 2, {0: (0, 1, 2), 1: (0, 1)}, "sha256:synthetic")


def pair_criterion(nan_at: tuple[int, int, int]) -> Criterion:
    """A pair criterion on RAGGED whose value at (layer, p, q) is NaN."""

    def fn(inputs: Inputs):
        values = np.ones((2, 3, 3))
        values[nan_at] = np.nan
        return values, np.ones((2, 3))

    return Criterion("nan-pairs", fn, "test", kind="pair", stats=("tokens",))


def test_nan_is_refused_on_real_pairs_only():
    """Layer 1 has 2 experts: its pair (0, 2) is padding and may hold anything; (0, 1) is real."""
    inputs = Inputs(RAGGED, Stats(RAGGED, {"tokens": np.array([4, 4])}, {}), None)
    assert evaluate(pair_criterion((1, 0, 2)), inputs)[2].shape == (2, 3, 3)
    with pytest.raises(MoePruneError) as raised:
        evaluate(pair_criterion((1, 0, 1)), inputs)
    assert str(raised.value) == (
        "criterion 'nan-pairs' gave NaN scores (first at MoE layer index 1); the statistics may be corrupt"
    )
    assert Criterion("c", len, "d", stats=("a", "b"), weights=True).needs() == "a, b, model weights"
