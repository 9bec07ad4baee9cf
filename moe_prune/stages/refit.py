"""`merge --refit` without stored refit sums: the calibration windows of the statistics, one sequential pass.

`profile` records in the statistics' provenance exactly which windows it counted (data, samples, seq-len,
seed, shard, text field, split, dtype, batch size, a hash of the tokens); the refit re-reads the same
windows the same way (`stages.calibration`) and solves each layer during one pass of the original model
(`merging.refit_pass`). Statistics that hold `refit_hh`/`refit_hy` (`profile --refit-stats`) are solved
from the stored sums instead (`stages.merge`): those sums add across shards and machines (`profile
combine`) and serve any number of merges without running the model again; the pass needs neither
the E x I x (I + H) floats per layer they cost nor a second profile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from moe_prune.artifacts.stats import Stats
from moe_prune.checkpoint.safetensors_io import FLOAT_DTYPES
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.errors import MoePruneError
from moe_prune.merging.refit import RIDGE
from moe_prune.merging.refit_pass import LayerFit, refit_pass
from moe_prune.merging.tensors import LayerPlan
from moe_prune.runtime.sequential import check_layerwise, open_layerwise
from moe_prune.stages.calibration import recorded_windows

SUM_FIELDS = ("refit_hh", "refit_hy")


def has_sums(stats: Stats) -> bool:
    """Whether the statistics carry the refit sums (then `merge --refit` solves from them)."""
    return any(name in stats.arrays for name in SUM_FIELDS)


def parse_ridge(value: str | float | None) -> float | None:
    """`--refit-ridge`: a relative ridge >= 0 (default 1e-6), or `auto` (None: chosen on held-out windows)."""
    if value is None or value == "auto":
        return None
    try:
        ridge = float(value)
    except ValueError as exc:
        raise MoePruneError(f"--refit-ridge {value!r}: expected a number such as 1e-4, or auto") from exc
    if not ridge >= 0 or ridge == float("inf"):
        raise MoePruneError(f"--refit-ridge {value!r}: expected a finite number >= 0, or auto")
    return ridge


PASS = "merge --refit's layer-by-layer pass (no refit sums in the statistics)"  # what `check_layerwise` names
INSTEAD = "profile with --refit-stats (the sums make the pass unneeded)"


def check_pass(ckpt: Checkpoint) -> None:
    """Refuse architectures that cannot run one decoder layer at a time (they need stored refit sums): the one
    refusal of `--sequential` (`runtime.sequential.check_layerwise`), naming the pass."""
    check_layerwise(ckpt, INSTEAD, PASS)


def refit_layers(
    model: str | Path,
    ckpt: Checkpoint,
    stats: Stats,
    plans: dict[int, LayerPlan],
    name: str,
    *,
    ridge: float | None = RIDGE,
    device: str = "cpu",
    trust_remote_code: bool = False,
    buffer_memory: int | None = None,
    refit_memory: int | None = None,
    expert_memory: int | None = None,
    spill: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[int, LayerPlan], list[LayerFit]]:
    """`plans` with every slot's down projection refit in one sequential pass; the fit of each layer.

    Hidden states past `buffer_memory` bytes and the solved down projections go to temporary files in `spill`;
    at most `refit_memory` bytes of sums are alive at once (None: half the available memory, `merging.refit_groups`).
    """
    config = ckpt.config
    check_pass(ckpt)
    chosen, settings = recorded_windows(ckpt, stats, name, trust_remote_code)
    layerwise = open_layerwise(ckpt, settings.dtype, device, trust_remote_code, INSTEAD, PASS)
    layerwise.expert_memory = expert_memory  # a layer's experts past it run a chunk at a time (runtime.expert_chunks)
    anchors = {layer: plan.anchors for layer, plan in plans.items()}
    result = refit_pass(
        layerwise,
        config,
        chosen,
        anchors,
        batch_size=settings.batch_size,
        ridge=ridge,
        buffer_memory=buffer_memory,
        refit_memory=refit_memory,
        spill=spill,
        progress=progress,
    )
    check_range(ckpt, result.fits)
    return {layer: replace(plan, refit=result.downs[layer]) for layer, plan in plans.items()}, result.fits


def check_range(ckpt: Checkpoint, fits: list[LayerFit]) -> None:
    """Refuse refit down projections past the largest finite value of the checkpoint's narrowest float dtype
    (written there they would be inf; bf16 and float32 reach 3.4e38, float16 only 65504)."""
    dtypes = {FLOAT_DTYPES[t.dtype] for t in ckpt.tensors if t.dtype in FLOAT_DTYPES}
    limits = {dtype: torch.finfo(getattr(torch, dtype)).max for dtype in dtypes}
    if not limits:
        return
    dtype = min(limits, key=limits.__getitem__)
    for fit in fits:
        if fit.max_abs > limits[dtype]:
            raise MoePruneError(
                f"{ckpt.folder}: the refit down projections of MoE layer {fit.layer} reach {fit.max_abs:.3g}, "
                f"past {dtype}'s largest value {limits[dtype]:.3g}; use a larger --refit-ridge (or auto)"
            )
