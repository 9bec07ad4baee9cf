"""Scoring helpers the criteria tests pass over (mutation survivors of issue #22 over scoring/): ragged padding,
per-token normalisation of a layer that saw no tokens, and the stability note."""

from __future__ import annotations

import warnings

import numpy as np

from moe_prune.artifacts.identity import ModelIdentity
from moe_prune.artifacts.stats import Stats
from moe_prune.scoring.registry import Inputs, get_criterion, stack_layers
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
