"""The calibration windows a `profile` run counted, read back from its statistics' provenance.

Statistics travel between people and machines (`profile combine`), and `Stats.load` checks only that their
provenance is an object; every value used here is checked first, so a hostile or hand-edited file is one
line naming it and the field, never a TypeError deep in the data reader. `recorded_windows` re-reads the
very windows `profile` counted (same sources, mixer, seed and shard, through the one data plan and
loader of `runtime.data_plan`, read as `stages.profile` reads them) and compares their number and, where
profile recorded it, the hash of their token ids (`windows_sha256`, `artifacts.provenance.hash_tokens`):
a data file edited to the same number of windows is refused too. `merge --refit`'s layer-by-layer pass
reads them (`stages.refit`); `allocate` reads its recorded reading settings through `recorded_reading`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from moe_prune.artifacts.common import json_type, require_int, require_type
from moe_prune.artifacts.provenance import hash_tokens
from moe_prune.artifacts.stats import Stats
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.errors import MoePruneError
from moe_prune.runtime.data_plan import calibration_plan, load_calibration, read_plan
from moe_prune.runtime.loading import load_tokenizer
from moe_prune.stages.profile import Settings, data_reading, shard_slice

INTEGERS = {"samples": 1, "seq_len": 2, "seed": 0, "batch_size": 1}  # field -> smallest value profile accepts
STRINGS = ("text_field", "split", "split_on", "dtype")
CALIBRATION = ("data", *INTEGERS, "shard", *STRINGS)
MAX_SEED = 2**31 - 1  # profile's --seed range


def recorded_settings(stats: Stats, name: str) -> Settings:
    """The profile settings that chose the statistics' windows, each checked; one line naming `name` otherwise."""
    provenance = stats.provenance
    missing = [key for key in CALIBRATION if key not in provenance]
    if missing:
        why = "combines several profile runs" if "combined" in provenance else f"does not record {missing[0]}"
        raise MoePruneError(
            f"{name}: {why}, so its calibration windows cannot be re-read; for merge --refit, profile with "
            "--refit-stats "
            "(sums that combine), or give statistics of one profile run"
        )
    values: dict[str, Any] = {
        key: require_int(provenance[key], name, f"provenance {key}", low) for key, low in INTEGERS.items()
    }
    if values["seed"] > MAX_SEED:
        raise MoePruneError(f"{name}: provenance seed must be at most {MAX_SEED}, not {values['seed']}")
    values |= {key: require_type(provenance[key], str, name, f"provenance {key}") for key in STRINGS}
    shard = require_type(provenance["shard"], list, name, "provenance shard")
    if len(shard) != 2:
        raise MoePruneError(f"{name}: provenance shard must be [i, n], not a list of {len(shard)}")
    values["shard"] = tuple(require_int(part, name, "provenance shard", 0) for part in shard)
    settings = Settings(**values)
    try:
        settings.check()
    except MoePruneError as exc:
        raise MoePruneError(f"{name}: its provenance records settings profile refuses ({exc})") from exc
    return settings


READING_DEFAULTS = {"seq_len": 256, "seed": 0, "text_field": "text", "split": "train", "split_on": "none"}


def recorded_reading(provenance: dict[str, Any], name: str) -> dict[str, Any]:
    """The window and reading settings a profile run recorded, each checked where present, a default where an
    older file lacks it (`allocate` judges on the data the scores came from): one line naming `name` otherwise."""
    values: dict[str, Any] = {}
    for key, default in READING_DEFAULTS.items():
        value = provenance.get(key)
        if not value:  # absent, or recorded empty: the default, as allocate always took it
            values[key] = default
        elif key in INTEGERS:
            values[key] = require_int(value, name, f"provenance {key}", INTEGERS[key])
        else:
            values[key] = require_type(value, str, name, f"provenance {key}")
    if values["seed"] > MAX_SEED:
        raise MoePruneError(f"{name}: provenance seed must be at most {MAX_SEED}, not {values['seed']}")
    return values


def recorded_data(stats: Stats, name: str) -> list[str]:
    """The `SOURCE[:SHARE]` specs profile read: a string or a non-empty list of strings in the provenance."""
    data = stats.provenance.get("data")
    specs = [data] if isinstance(data, str) else require_type(data, list, name, "provenance data")
    for spec in specs:
        if not isinstance(spec, str) or not spec:
            raise MoePruneError(f"{name}: provenance data must list sources as strings, not {json_type(spec)}")
    if not specs:
        raise MoePruneError(f"{name}: provenance data lists no source")
    return specs


def recorded_windows(
    ckpt: Checkpoint, stats: Stats, name: str, trust_remote_code: bool
) -> tuple[torch.Tensor, Settings]:
    """[N, seq_len] the very windows `profile` counted, and its settings; refused when the data changed since."""
    settings = replace(recorded_settings(stats, name), trust_remote_code=trust_remote_code)
    plan = calibration_plan(
        recorded_data(stats, name), settings.samples, settings.seq_len, settings.seed, data_reading(settings)
    )
    sources = read_plan(plan)  # the data's problems before the tokenizer's, as in profile
    tokenizer = load_tokenizer(ckpt, trust_remote_code)
    chunks = load_calibration(plan, tokenizer, settings.seq_len, sources).windows
    chosen = chunks[shard_slice(len(chunks), settings.shard)]
    provenance = stats.provenance
    counted = require_int(provenance.get("sequences", len(chosen)), name, "provenance sequences", 1)
    if len(chosen) != counted:
        raise MoePruneError(
            f"{name}: its calibration data now gives {len(chosen)} windows, the statistics counted {counted}; "
            "the data changed since `profile` (profile again)"
        )
    recorded = provenance.get("windows_sha256")  # statistics of older versions do not record it
    if recorded is not None and require_type(recorded, str, name, "provenance windows_sha256") != hash_tokens(chosen):
        raise MoePruneError(
            f"{name}: its calibration data now gives other tokens than the {counted} windows the statistics "
            "counted (windows_sha256 differs); the data changed since `profile` (profile again)"
        )
    return chosen, settings
