"""`profile`'s model runs: the model loaded whole, or one decoder layer at a time from the safetensors files
(`--sequential`), and every batch once under the statistics recorder (and gradients); `stages.profile` chooses
the windows and records the result.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from moe_prune.checkpoint.source import Checkpoint
from moe_prune.runtime import distributed
from moe_prune.runtime import gradients as grad_stats
from moe_prune.runtime.layer_pass import LayerPass, output_head
from moe_prune.runtime.loading import input_device, load_model
from moe_prune.runtime.resume import Resumable
from moe_prune.runtime.sequential import LayerwiseModel, open_layerwise
from moe_prune.runtime.statistics import StatisticsRecorder
from moe_prune.specs.profile import ProfileSpec as Settings
from moe_prune.stages.profile_for import wanted
from moe_prune.training.losses import token_cross_entropy

# progress(tokens_done, tokens_total): called before the first batch and after each one.
ProgressFn = Callable[[int, int], None]


def stat_fields(settings: Settings) -> frozenset[str] | None:
    """The forward statistics to record: None for all, else those `for_names` read (`stages.profile_for`)."""
    return wanted(settings.for_names).fields if settings.for_names else None


def batch_slices(windows: torch.Tensor, batch_size: int) -> list[slice]:
    """The rows of each batch, in order (the last one may be short)."""
    return [slice(start, start + batch_size) for start in range(0, len(windows), batch_size)]


def collect(
    model: Any,
    config: Any,
    windows: torch.Tensor,
    settings: Settings,
    progress: ProgressFn | None,
    resumable: Resumable | None = None,
    resume: bool = False,
) -> tuple[dict[str, np.ndarray], int]:
    """Run every batch once under the recorder; returns the arrays and the number of next-token predictions."""
    report = progress or (lambda done, total: None)
    device = input_device(model)
    total_tokens = int(windows.numel())
    predictions = 0
    recorder = StatisticsRecorder(model, config, settings.expert_outputs, settings.refit_stats, stat_fields(settings))
    grads = grad_stats.expert_gradients(model, config) if settings.gradients else nullcontext()
    batches = batch_slices(windows, settings.batch_size)
    with recorder, grads as expert_params:
        done = 0
        if resume and resumable is not None:
            done, predictions = resumable.restore(recorder, expert_params, device)
        report(min(done * settings.batch_size, len(windows)) * windows.shape[1], total_tokens)
        for number, rows in enumerate(batches[done:], start=done + 1):
            batch = windows[rows].to(device)
            recorder.set_input_ids(batch)
            if settings.gradients:
                token_cross_entropy(model(input_ids=batch, use_cache=False).logits, batch, "sum").backward()
                predictions += batch[:, 1:].numel()
            else:
                with torch.inference_mode():
                    model(input_ids=batch, use_cache=False)
            if resumable is not None and resumable.due(number, len(batches)):
                resumable.save(recorder, expert_params, number, predictions)
            report(min(rows.stop, len(windows)) * windows.shape[1], total_tokens)
        arrays = recorder.arrays()
        if expert_params is not None:
            size = distributed.world().size
            predictions = distributed.reduce_gradients(expert_params, predictions, size)
            arrays.update(grad_stats.reduce(expert_params, config.num_experts, recorder.hidden_size, predictions))
    return arrays, predictions


def collect_sequential(
    model: LayerwiseModel, config: Any, windows: torch.Tensor, settings: Settings, progress: ProgressFn | None
) -> tuple[dict[str, np.ndarray], int]:
    """Every batch through one decoder layer at a time (`runtime.layer_pass`); the same statistics as `collect`."""
    report = progress or (lambda done, total: None)
    total_work = int(windows.numel()) * (len(model.layers) + 1)
    report(0, total_work)
    recorder = StatisticsRecorder(
        model.model, config, settings.expert_outputs, settings.refit_stats, stat_fields(settings)
    )
    moe = set(config.moe_layers)

    def rows_done(rows: slice) -> int:
        return min(rows.stop, len(windows)) * windows.shape[1]

    with LayerPass(model, windows, batch_slices(windows, settings.batch_size), settings.buffer_memory) as layerwise:
        layerwise.embed(output_head(model.model), lambda rows: report(rows_done(rows), total_work))
        for layer, block in layerwise.layers():
            done = int((layer + 1) * windows.numel())  # the embedding pass and the layers before
            watch = recorder.watching({layer}) if layer in moe else nullcontext()
            with watch, torch.inference_mode():
                layerwise.run(
                    block, layer, before=lambda rows: recorder.set_input_ids(windows[rows].to(model.device)),
                    after=lambda rows: report(done + rows_done(rows), total_work),  # noqa: B023
                )  # fmt: skip
    return recorder.arrays(), 0


def load_profiled(ckpt: Checkpoint, settings: Settings) -> tuple[Any, Any]:
    """The model (whole, or layer by layer with --sequential) and its transformers config."""
    if settings.sequential:
        loaded = open_layerwise(
            ckpt,
            settings.dtype,
            settings.device,
            settings.trust_remote_code,
            "profile the whole model (--device-map auto for large ones)",
        )
        loaded.expert_memory = settings.expert_memory
        return loaded, loaded.model.config
    loaded = load_model(ckpt, settings.dtype, settings.device, settings.trust_remote_code)
    return loaded, loaded.config
