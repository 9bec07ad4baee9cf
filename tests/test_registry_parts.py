"""`scoring.registry.stack_layers`: a ragged model's per-layer scores padded to one array (a mutation survivor of
issue #22: no selected test scored layers of different widths directly)."""

from __future__ import annotations

import numpy as np

from moe_prune.scoring.registry import stack_layers


def test_smaller_layers_are_zero_padded_to_every_slot():
    rows = [np.arange(1.0, 5.0), np.arange(1.0, 3.0), np.arange(1.0, 4.0)]
    want = np.zeros((3, 4))
    for layer, row in enumerate(rows):
        want[layer, : len(row)] = row
    np.testing.assert_array_equal(stack_layers(rows, 4), want)
    pairs = [np.ones((4, 4)), np.ones((2, 2))]  # pair scores [E_l, E_l] pad both axes
    got = stack_layers(pairs, 4)
    assert got.shape == (2, 4, 4) and got[1].sum() == 4 and got[1, :2, :2].sum() == 4
