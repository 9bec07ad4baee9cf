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
from moe_prune.runtime.loading import load_model, load_tokenizer
from moe_prune.runtime.sources import parse_sources, read_sources
from moe_prune.stages import profile


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
    ckpt: Checkpoint, stats: Stats, calibration: Calibration
) -> tuple[Any, torch.Tensor, list[str]]:
    """(loaded model, windows [N, S], warnings): the first `samples` windows of the calibration stream."""
    facts = recorded(stats)
    data = calibration.data or facts.get("data")
    if not data:
        raise MoePruneError("the statistics do not record their calibration data; pass --data")
    specs = parse_sources([data] if isinstance(data, str) else list(data))
    for spec in specs:
        if Path(spec.source).resolve() == DEMO_HELDOUT.resolve():
            raise MoePruneError(f"--data {spec.source}: the held-out set; judge candidates on calibration data")
    seq_len = calibration.seq_len or int(facts.get("seq_len") or 256)
    settings = profile.Settings(
        samples=calibration.samples,
        seq_len=seq_len,
        seed=int(facts.get("seed") or 0),
        text_field=str(facts.get("text_field") or "text"),
        split=str(facts.get("split") or "train"),
        split_on=str(facts.get("split_on") or "none"),
        dtype=calibration.dtype,
        device=calibration.device,
        trust_remote_code=calibration.trust_remote_code,
    )
    settings.check()
    sources = read_sources(
        specs, settings.samples * seq_len, pool=profile.POOL_FACTOR, what=profile.BUDGET, read=profile._reader(settings)
    )
    tokenizer = load_tokenizer(ckpt, settings.trust_remote_code)
    model = load_model(ckpt, settings.dtype, settings.device, settings.trust_remote_code)
    used = clip_seq_len(seq_len, model.config)
    _, windows, warnings = profile._windows(sources, tokenizer, used, settings)
    return model, windows[: settings.samples], warnings
