"""`profile`: routing, logit, activation (and optionally gradient) statistics of a model on calibration data.

Data: one source or a mix (`data` a list of `SOURCE[:SHARE]`, see `runtime.sources`), each source's
documents tokenized into one stream (joined by EOS, see `runtime.data`). The budget is samples x
seq_len tokens (seq_len clipped to the model's context); each source gives its share of it as windows
of `seq_len` tokens drawn with `seed` from at most `POOL_FACTOR` times its share (kept in stream
order), so a huge corpus is never tokenized whole; the sources follow each other and the stream is cut
into windows. Fewer windows than `samples` are used with a warning when the data runs out. `shard=(i,
n)` keeps the i-th of n contiguous slices of those windows, so several machines profile disjoint parts
of the same mixed stream and `combine` adds their files. Provenance lists every source with its share
and the tokens it gave to this file's windows.

One forward pass per batch collects every forward statistic (`runtime.statistics`); with
`gradients=True` the same pass also runs backward on the summed next-token loss and the gradient
statistics are reduced once at the end (`runtime.gradients`). The model runs are `stages.profile_collect`,
adding files `stages.profile_combine` (both re-exported here); the windows come from the one data plan
(`runtime.data_plan`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import moe_prune
from moe_prune.architectures.config import ModelConfig
from moe_prune.artifacts.provenance import hash_tokens
from moe_prune.artifacts.stats import Stats
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.errors import MoePruneError
from moe_prune.io.output import work_lock
from moe_prune.runtime import distributed
from moe_prune.runtime.data import clip_seq_len, fixed_chunks
from moe_prune.runtime.data_plan import BUDGET as BUDGET
from moe_prune.runtime.data_plan import POOL_FACTOR as POOL_FACTOR
from moe_prune.runtime.data_plan import DataLike, Reading, calibration_plan, load_calibration, read_plan
from moe_prune.runtime.data_plan import parse_data as parse_data
from moe_prune.runtime.loading import load_tokenizer
from moe_prune.runtime.resume import Resumable
from moe_prune.runtime.resume import partial_path as partial_path
from moe_prune.runtime.routing import load_balance
from moe_prune.runtime.sources import take
from moe_prune.specs.fields import fingerprint
from moe_prune.specs.profile import RESUMED
from moe_prune.specs.profile import ProfileSpec as Settings
from moe_prune.stages.profile_collect import ProgressFn as ProgressFn
from moe_prune.stages.profile_collect import collect as _collect
from moe_prune.stages.profile_collect import collect_sequential as _collect_sequential
from moe_prune.stages.profile_collect import load_profiled
from moe_prune.stages.profile_collect import stat_fields as stat_fields
from moe_prune.stages.profile_combine import MODEL_FACTS as MODEL_FACTS
from moe_prune.stages.profile_combine import WINDOW_FIELDS as WINDOW_FIELDS
from moe_prune.stages.profile_combine import combine as combine
from moe_prune.stages.profile_combine import refuse_overlap as refuse_overlap
from moe_prune.stages.profile_for import wanted
from moe_prune.stages.tasks import TASK_PREFIX as TASK_PREFIX  # imported for its registered `task:` reader


def with_opt_ins(settings: Settings) -> Settings:
    """`--for` names that read gradient, every-expert or refit statistics turn those passes on (names cleaned)."""
    if not settings.for_names:
        return settings
    want = wanted(settings.for_names)
    return replace(
        settings,
        for_names=want.names,
        gradients=settings.gradients or want.gradients,
        expert_outputs=settings.expert_outputs or want.expert_outputs,
        refit_stats=settings.refit_stats or want.refit_stats,
    )


@dataclass
class LayerSummary:
    """How one MoE layer used its experts on the calibration data."""

    layer: int
    tokens: int
    min_share: float  # smallest expert's share of the layer's top-k selections
    max_share: float
    max_over_mean: float
    entropy: float  # H(load) / log(E)


@dataclass
class ProfileResult:
    """The statistics and what the run saw."""

    stats: Stats
    sequences: int
    seq_len: int
    tokens: int
    layers: list[LayerSummary]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sequences": self.sequences,
            "seq_len": self.seq_len,
            "tokens": self.tokens,
            "statistics": sorted(self.stats.arrays),
            "provenance": self.stats.provenance,
            "layers": [asdict(layer) for layer in self.layers],
            "warnings": self.warnings,
        }


def choose_windows(ids: torch.Tensor, seq_len: int, samples: int, seed: int) -> torch.Tensor:
    """[N, seq_len]: `samples` windows drawn with `seed` (stream order kept), or all when fewer exist.

    What one source without a share gives `run` (`runtime.sources.take`).
    """
    return fixed_chunks(take(ids, samples * seq_len, seq_len, seed), seq_len)


def shard_slice(count: int, shard: tuple[int, int]) -> slice:
    """The i-th of n contiguous, nearly equal slices of `count` items."""
    index, parts = shard
    return slice(index * count // parts, (index + 1) * count // parts)


def summarize(stats: Stats, top_k: int) -> list[LayerSummary]:
    """Per-layer usage spread from the hard counts."""
    rows = []
    arrays = stats.arrays
    for layer, tokens, counts in zip(stats.identity.moe_layers, arrays["tokens"], arrays["hard_counts"], strict=True):
        total = max(int(tokens) * top_k, 1)
        max_over_mean, entropy = load_balance(counts.tolist())
        shares = counts / total
        rows.append(LayerSummary(layer, int(tokens), float(shares.min()), float(shares.max()), max_over_mean, entropy))
    return rows


def model_facts(config: ModelConfig) -> dict[str, Any]:
    """What `score` needs to know of the model when given statistics alone (no --model)."""
    vocab = config.get("vocab_size")
    return {"top_k": config.top_k, "n_group": config.n_group, "vocab_size": vocab if isinstance(vocab, int) else None}


def run(
    model: str | Path,
    data: DataLike,
    settings: Settings = Settings(),
    progress: ProgressFn | None = None,
    partial: Path | None = None,
    resume: bool = False,
    save: Callable[[ProfileResult], None] | None = None,
) -> ProfileResult:
    """Profile `model` on `data` (one source or several `SOURCE[:SHARE]`, or their parsed `SourceSpec`s: parsed
    once, see `runtime.data_plan`); nothing is written but `partial`.

    Under a distributed launch every process profiles its own slice and all get the combined result.
    Each process holds its `partial` (`work_lock`, one file per process) from the start: a second run on
    the same output, which would write over and resume from the same partial files, is refused in one
    line before it reads anything. `save` (the CLI's writer of the output) runs while the partial is still
    held, and the partial is deleted only after it succeeded and before the lock is released: a run that
    starts once the lock is free never has its own partial file deleted by this one.
    """
    settings = with_opt_ins(settings)
    settings.check()
    with work_lock(partial) if partial is not None else nullcontext():
        result = _profile(model, data, settings, progress, partial, resume)
        if save is not None:
            save(result)
        if partial is not None:
            discard_partial(partial)
        return result


def discard_partial(partial: Path) -> None:
    """Delete this process's resumable state once its result is saved (called with the partial held)."""
    partial.unlink(missing_ok=True)


def _profile(
    model: str | Path,
    data: DataLike,
    settings: Settings,
    progress: ProgressFn | None,
    partial: Path | None,
    resume: bool,
) -> ProfileResult:
    """The run itself, once its partial file (if any) is held."""
    place = distributed.world()
    settings = replace(settings, device=place.device(settings.device))
    ckpt = Checkpoint.open(model)
    identity = ckpt.identity  # config problems surface before any data is read
    config = ckpt.config
    plan = calibration_plan(data, settings.samples, settings.seq_len, settings.seed, data_reading(settings))
    sources = read_plan(plan)
    tokenizer = load_tokenizer(ckpt, settings.trust_remote_code)
    loaded, hf_config = load_profiled(ckpt, settings)
    seq_len = clip_seq_len(settings.seq_len, hf_config)
    cut = load_calibration(plan, tokenizer, seq_len, sources)
    mixed, windows, warnings = cut.mix, cut.windows, cut.warnings
    total = len(windows)
    part = shard_slice(total, settings.shard)
    windows = windows[part]
    if len(windows) == 0:
        raise MoePruneError(f"shard {settings.shard[0]}/{settings.shard[1]} of {total} sequences is empty")
    mine = windows[shard_slice(len(windows), (place.rank, place.size))]
    if settings.sequential:
        arrays, predictions = _collect_sequential(loaded, config, mine, settings, progress)
    else:
        resumable = Resumable(partial, _fingerprint(identity, windows, settings, place), settings.save_every)
        arrays, predictions = _collect(loaded, config, mine, settings, progress, resumable if partial else None, resume)
    arrays = distributed.reduce_arrays(arrays, place.size)
    where = (plan, sources, mixed.provenance(part.start * seq_len, part.stop * seq_len), place.size)
    provenance = _provenance(model, settings, where, total, windows, seq_len, predictions, config)
    stats = Stats(identity, arrays, provenance)
    tokens = int(windows.numel())
    return ProfileResult(stats, len(windows), seq_len, tokens, summarize(stats, config.top_k), warnings)


def _provenance(
    model: str | Path,
    settings: Settings,
    where: tuple[Any, list[Any], list[dict[str, Any]], int],
    total: int,
    windows: Any,
    seq_len: int,
    predictions: Any,
    config: ModelConfig,
) -> dict[str, Any]:
    """What the statistics record of their run; `where`: (the calibration plan, its sources, the sources' shares
    of this shard's windows, the process count)."""
    plan, sources, mixed, processes = where
    return {
        "tool": f"moe-prune {moe_prune.__version__}",
        "model": str(model),
        "data": plan.given,
        "sources": mixed,
        "text_field": settings.text_field,
        "split": (sources[0].split if len(sources) == 1 else None) or settings.split,
        "split_on": settings.split_on,
        "samples": settings.samples,
        "sequences_available": total,
        "sequences": len(windows),
        "windows_sha256": hash_tokens(windows),  # which windows: merge --refit re-reads and compares them
        "seq_len": seq_len,
        "seed": settings.seed,
        "shard": list(settings.shard),
        "batch_size": settings.batch_size,
        "dtype": settings.dtype,
        "gradients": settings.gradients,
        "expert_outputs": settings.expert_outputs,
        "refit_stats": settings.refit_stats,
        "predictions": predictions if settings.gradients else None,
        "sequential": settings.sequential,
        "processes": processes,
        "for": list(settings.for_names) or None,
        **model_facts(config),
    }


def data_reading(settings: Settings) -> Reading:
    """How profile reads its sources: `task:NAME` through its registered reader (`stages.tasks`), the rest as
    files or hub datasets with the settings' field, split and .txt cutting."""
    return Reading(
        settings.text_field,
        settings.split,
        settings.split_on,
        settings.include_path,
        settings.trust_remote_code,
        prefixed=True,
    )


def _fingerprint(identity: Any, windows: torch.Tensor, settings: Settings, place: distributed.World) -> str:
    """What must not change between an interrupted run and its resumption: model, tokens, the spec's fields."""
    digest = hashlib.sha256()
    digest.update(json.dumps(identity.to_dict(), sort_keys=True).encode())
    digest.update(np.ascontiguousarray(windows.numpy()).tobytes())
    digest.update(repr(resume_options(settings, place)).encode())
    return digest.hexdigest()


def resume_options(settings: Settings, place: distributed.World) -> tuple[Any, ...]:
    """The spec's `RESUMED` fields (`specs.profile`), read off its result-affecting record (`specs.fields.fingerprint`,
    as finetune's fingerprint is), and the process's place, laid out as the first releases' partial files hold them."""
    given = fingerprint(settings)
    always, opt_ins, chosen = RESUMED
    options = (*(given[name] for name in always), place.rank, place.size)
    if any(given[name] for name in opt_ins):  # fingerprints of runs without them stay as they were
        options += tuple(given[name] for name in opt_ins)
    if any(given[name] for name in chosen):  # what --for records, not the names as given
        options += (sorted(stat_fields(settings) or ()),)
    return options
