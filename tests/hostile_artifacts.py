"""Hostile cases: hostile_artifacts (registered with @hostile)."""

from __future__ import annotations

import numpy as np
from hostile import (
    STATS_READERS,
    Workspace,
    hostile,
)


@hostile("stats-negative-counts", STATS_READERS, "stats.npz")
def _(ws: Workspace) -> None:
    arrays = ws.stats_arrays()
    arrays["hard_counts"] = -np.abs(arrays["hard_counts"]) - 1
    ws.write_stats(arrays)


@hostile("mask-float-ids", ("prune",), "mask.json")
def _(ws: Workspace) -> None:
    mask = ws.mask_json()
    layer = next(iter(mask["layers"].values()))
    layer["keep"] = [float(i) for i in layer["keep"]]
    layer.pop("drop", None)
    ws.write_mask(mask)
