"""The windows `allocate` judges candidates on: calibration-side data, chosen as `profile` chooses them.

By default the data, sequence length, seed and reading options recorded in the statistics' provenance
(a combined file: its first part's), so candidates are judged on the distribution the scores came from;
`--data` replaces the source. The demo's held-out file is refused: the objective must never see the
tokens perplexity is later measured on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_prune.artifacts.stats import Stats
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.demo import DEMO_HELDOUT
from moe_prune.errors import MoePruneError
from moe_prune.runtime.data import clip_seq_len
from moe_prune.runtime.data_plan import calibration_plan, load_calibration, parse_data, read_plan
from moe_prune.runtime.loading import load_model, load_tokenizer
from moe_prune.stages import profile
from moe_prune.stages.calibration import recorded_reading


@dataclass(frozen=True)
class Calibration:
    """Where the candidates are judged: calibration-side windows, never the held-out set."""

    data: Sequence[str] | None = None  # None: the data the statistics were profiled on
    samples: int = 16
    seq_len: int | None = None  # None: the statistics' sequence length
    batch_size: int = 8
    top: int = 2048  # the original's most likely tokens kept per position
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False


def recorded(stats: Stats) -> dict[str, Any]:
    """The profile run's own provenance (a combined file's first part)."""
    combined = stats.provenance.get("combined")
    if isinstance(combined, list) and combined and isinstance(combined[0], dict):
        return combined[0]
    return stats.provenance


def calibration_windows(
    ckpt: Checkpoint, stats: Stats, calibration: Calibration, name: str = "the statistics"
) -> tuple[Any, torch.Tensor, list[str]]:
    """(loaded model, windows [N, S], warnings): the first `samples` windows of the calibration stream, made by
    the one data plan and loader (`runtime.data_plan`) from the recorded settings `stages.calibration` checks."""
    facts = recorded(stats)
    data = calibration.data or facts.get("data")
    if not data:
        raise MoePruneError("the statistics do not record their calibration data; pass --data")
    specs = parse_data(data)
    for spec in specs:
        if Path(spec.source).resolve() == DEMO_HELDOUT.resolve():
            raise MoePruneError(f"--data {spec.source}: the held-out set; judge candidates on calibration data")
    reading = recorded_reading(facts, name)
    seq_len = calibration.seq_len or reading["seq_len"]
    settings = profile.Settings(
        samples=calibration.samples,
        seq_len=seq_len,
        seed=reading["seed"],
        text_field=reading["text_field"],
        split=reading["split"],
        split_on=reading["split_on"],
        dtype=calibration.dtype,
        device=calibration.device,
        trust_remote_code=calibration.trust_remote_code,
    )
    settings.check()
    plan = calibration_plan(specs, settings.samples, seq_len, settings.seed, profile.data_reading(settings))
    sources = read_plan(plan)
    tokenizer = load_tokenizer(ckpt, settings.trust_remote_code)
    model = load_model(ckpt, settings.dtype, settings.device, settings.trust_remote_code)
    loaded = load_calibration(plan, tokenizer, clip_seq_len(seq_len, model.config), sources)
    return model, loaded.windows[: settings.samples], loaded.warnings
