"""`profile --combine`: statistics of disjoint data added into one file, refusing the same windows twice."""

from __future__ import annotations

import json
from pathlib import Path

import moe_prune
from moe_prune.artifacts.stats import Stats
from moe_prune.errors import MoePruneError

MODEL_FACTS = ("top_k", "n_group", "vocab_size")  # what `score` needs of the model, kept in a combined file


# Provenance fields that fix which calibration windows a file counted: equal in two files = the same tokens.
WINDOW_FIELDS = ("data", "text_field", "split", "split_on", "samples", "seq_len", "seed", "shard")


def refuse_overlap(paths: list[Path], loaded: list[Stats]) -> None:
    """Sums of the same data added twice would count it twice: refuse a file given twice or the same windows."""
    seen: dict[object, Path] = {}
    for path, stats in zip(paths, loaded, strict=True):
        windows = tuple(json.dumps(stats.provenance.get(k), sort_keys=True) for k in WINDOW_FIELDS)
        keys = [("file", path.resolve())]
        if "data" in stats.provenance:  # a file of one profile run (a combined file lists its sources instead)
            keys.append(("windows", windows))
        for key in keys:
            if key in seen:
                raise MoePruneError(
                    f"{path}: counts the same calibration windows as {seen[key]} (same file, or the same data, "
                    "samples, seq-len, seed and shard); combining them would count those tokens twice"
                )
            seen[key] = path


def combine(paths: list[Path]) -> Stats:
    """Statistics of the union of disjoint data: every file must describe the same model."""
    if len(paths) < 2:
        raise MoePruneError("combine needs at least two statistics files")
    loaded = [Stats.load(path) for path in paths]
    refuse_overlap(paths, loaded)
    merged = loaded[0]
    for path, stats in zip(paths[1:], loaded[1:], strict=True):
        merged = merged.combine(stats, str(path), first_name=str(paths[0]))
    sources = [{"file": str(path), **stats.provenance} for path, stats in zip(paths, loaded, strict=True)]
    facts = {key: loaded[0].provenance[key] for key in MODEL_FACTS if key in loaded[0].provenance}
    merged.provenance = {"tool": f"moe-prune {moe_prune.__version__}", **facts, "combined": sources}
    return merged
