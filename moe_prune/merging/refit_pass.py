"""`merge --refit` in one sequential pass: per MoE layer, sum the anchors' normal equations, solve, store, free.

GPTQ-style (Frantar et al. 2023, section 3, "layer-wise" processing): the calibration windows run through the
ORIGINAL model one decoder layer at a time (`runtime.sequential.LayerwiseModel`, the `profile --sequential`
machinery); while a MoE layer runs, `runtime.refit_sums.AnchorSums` adds hh and hy of the experts that
become slots, then each slot's down projection is solved (`merging.refit`), written to a temporary file
(`merging.refit_store`) and the sums are freed before the next layer loads. Alive at once: one layer's
weights, the float64 sums of at most `refit_memory` bytes of that layer's slots (`merging.refit_groups`:
the D slots in groups, the layer run once per group over the buffered inputs, the last run's outputs
feeding the next layer; one group of all D x I x (I + H) when they fit), one slot's solve and the hidden
states of the windows; never the E x I x (I + H) per layer of every layer that `profile --refit-stats`
stores. The inputs of every layer are
the original model's, as in the whole-model profile, so the result equals the two-step refit up to float
summation order. Layers after the last refit layer are not run.

Held-out ridge (`ridge=None`): one window in eight (`held_out_rows`: the last of each of N/8 equal runs of
consecutive windows, spread over the whole stream, so each source of a `--data` mixture, which follow one
another, gives its share; a tail would be the last source alone) is kept out of the sums; once the fit
windows have run, each slot's hh is replaced in place by its eigendecomposition and the held-out
windows score every candidate of `merging.refit.RIDGES`; each slot takes the ridge with the smallest
held-out error. The held-out windows still run through the layer (the next layer needs their states), but
the written solution is the one fitted on the other 7/8 (the eigendecomposition replaced the sums).
With several groups each group runs both phases (fit windows, then held-out windows) and the held-out
errors of all slots add up to the layer's; each slot's choice is its own, so the grouping changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moe_prune.architectures.config import ModelConfig
from moe_prune.errors import MoePruneError
from moe_prune.merging.refit import RIDGE, RIDGES, candidate_errors, eigen_fit, least_squares_down, ridge_solution
from moe_prune.merging.refit_groups import check_bound, layer_budget, slot_groups
from moe_prune.merging.refit_store import SpilledDowns
from moe_prune.runtime import expert_chunks
from moe_prune.runtime.layer_pass import LayerPass, output_head
from moe_prune.runtime.refit_sums import AnchorSums, refit_check, slot_bytes
from moe_prune.runtime.sequential import LayerwiseModel

HELD_OUT = 0.125  # share of the windows that choose the ridge (at least one window)


@dataclass
class LayerFit:
    """What the refit of one MoE layer chose and how its down projections compare to the original's."""

    layer: int
    ridges: list[float]  # per slot
    max_abs: float  # largest |D| of the refit down projections
    original_max_abs: float  # largest |D| of the layer's original down projections
    max_norm: float  # largest Frobenius norm of a refit down projection
    original_max_norm: float
    held_out_error: float | None = None  # sum p ||Dh - y||^2 / sum p ||y||^2 on held-out windows, chosen ridges
    held_out_errors: dict[str, float] = field(default_factory=dict)  # the same for every candidate ridge, all slots


@dataclass
class PassResult:
    downs: dict[int, SpilledDowns]
    fits: list[LayerFit]


def _batches(count: int, batch_size: int, start: int = 0) -> list[slice]:
    return [slice(s, min(s + batch_size, count)) for s in range(start, count, batch_size)]


def held_out_rows(count: int) -> list[int]:
    """Rows of `count` windows that choose the ridge: the last of each of round(count / 8) equal runs (>= 1)."""
    runs = max(1, round(count * HELD_OUT))
    return [(i + 1) * count // runs - 1 for i in range(runs)]


def refit_pass(
    model: LayerwiseModel,
    config: ModelConfig,
    windows: torch.Tensor,
    anchors: dict[int, list[int]],
    *,
    batch_size: int,
    ridge: float | None = RIDGE,
    buffer_memory: int | None = None,
    refit_memory: int | None = None,
    spill: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PassResult:
    """Solve every layer of `anchors` ({decoder layer: current expert ids that become slots}) in one pass.

    `ridge` None chooses each slot's ridge on held-out windows (module docstring), else it is fixed.
    `refit_memory` bounds the bytes of sums alive at once (`merging.refit_groups`; None: automatic).
    """
    adapter = config.adapter
    per_slot = {}
    for layer in anchors:  # every refusal before the first forward pass
        experts = model.model.get_submodule(f"{adapter.runtime_layers}.{layer}.{adapter.runtime_experts}")
        refit_check(experts, config, layer)
        per_slot[layer] = slot_bytes(model.model, experts)
    check_bound(refit_memory, per_slot)
    if ridge is None and len(windows) < 2:
        raise MoePruneError("--refit-ridge auto holds out calibration windows; the statistics counted only one")
    held = held_out_rows(len(windows)) if ridge is None else []
    if held:  # the fit windows first, then the held-out ones: the sums do not depend on the windows' order
        fitted = sorted(set(range(len(windows))) - set(held))
        windows = windows[fitted + held]
    split = len(windows) - len(held)
    runner = _Layers(model, windows, batch_size, split, max(anchors, default=-1), progress, buffer_memory, spill)
    result = PassResult({}, [])
    with runner.layerwise:
        runner.embed()
        for layer, block in runner.layerwise.layers(runner.last + 1):
            if layer in anchors:
                budget = layer_budget(refit_memory, model.device, expert_chunks.held_bytes(block))
                groups = slot_groups(len(anchors[layer]), per_slot[layer], budget)
                result.downs[layer], fit = _refit_layer(runner, block, config, layer, anchors[layer], groups, ridge)
                result.fits.append(fit)
            else:
                with torch.inference_mode():
                    runner.run(block, layer, runner.fit + runner.held)
    return result


def _refit_layer(
    runner: _Layers,
    block: torch.nn.Module,
    config: ModelConfig,
    layer: int,
    anchors: list[int],
    groups: list[slice],
    ridge: float | None,
) -> tuple[SpilledDowns, LayerFit]:
    """One MoE layer's slots, a group at a time: the layer runs once per group over the buffered inputs, only
    the group's sums alive; the last run hands its outputs to the next layer (the others leave the buffer)."""
    store = SpilledDowns([], runner.spill)
    fit = LayerFit(layer, [], 0.0, 0.0, 0.0, 0.0)
    errors = torch.zeros(len(anchors), len(RIDGES), dtype=torch.float64)  # held-out, every slot x candidate
    norms = torch.zeros(len(anchors), dtype=torch.float64)
    for part, group in enumerate(groups):
        write = part == len(groups) - 1

        def run(batches: list[slice], write: bool = write, part: int = part) -> None:
            runner.run(block, layer, batches, write, (part, len(groups)))

        sums = AnchorSums(runner.model.model, config, layer, anchors[group])
        with sums, torch.inference_mode():
            run(runner.fit)
            _solve(sums, ridge, lambda: run(runner.held), store, fit, errors[group], norms[group])
            for expert in sums.anchors:  # one slot at a time: no copy of the layer's down projections
                down = expert_chunks.expert_param(sums.experts, "down_proj", expert).detach()
                fit.original_max_abs = max(fit.original_max_abs, float(down.abs().max()))
                fit.original_max_norm = max(fit.original_max_norm, float(torch.linalg.matrix_norm(down.double())))
        sums.release()
    if ridge is None:
        best = errors.argmin(dim=1)
        total = float(norms.sum()) or 1.0
        fit.held_out_error = float(errors.gather(1, best[:, None]).sum()) / total
        fit.held_out_errors = {f"{r:g}": float(errors[:, i].sum()) / total for i, r in enumerate(RIDGES)}
    return store, fit


class _Layers:
    """The pass's windows (fit ones first, then held-out ones) through the one layer-by-layer loop
    (`runtime.layer_pass.LayerPass`, hidden states past `buffer_memory` spilled to `spill`), and its progress."""

    def __init__(
        self,
        model: LayerwiseModel,
        windows: torch.Tensor,
        batch_size: int,
        split: int,
        last: int,
        progress: Callable[[int, int], None] | None,
        buffer_memory: int | None = None,
        spill: Path | None = None,
    ) -> None:
        self.model, self.windows, self.last, self.spill = model, windows, last, spill
        self.fit, self.held = _batches(split, batch_size), _batches(len(windows), batch_size, split)
        self.report = progress or (lambda done, total: None)
        self.total = int(windows.numel()) * (last + 2)
        self.layerwise = LayerPass(model, windows, self.fit + self.held, buffer_memory, spill)

    def embed(self) -> None:
        """Every window's input to the first decoder layer, and what the model passes each layer."""
        self.report(0, self.total)
        length = self.windows.shape[1]
        self.layerwise.embed(output_head(self.model.model), lambda rows: self.report(rows.stop * length, self.total))

    def run(
        self, block: torch.nn.Module, layer: int, batches: list[slice], write: bool = True, part: tuple = (0, 1)
    ) -> None:
        """Decoder layer `layer` on these batches, its outputs replacing its inputs if `write`; run `part[0]`
        of `part[1]` over the layer (progress: each run is that share of the layer)."""
        count, length = self.windows.shape[:2]

        def after(rows: slice) -> None:
            share = (part[0] * count + rows.stop) * length // part[1]
            self.report(int((layer + 1) * self.windows.numel() + share), self.total)

        self.layerwise.run(block, layer, batches, write=write, after=after)


def _solve(
    sums: AnchorSums,
    ridge: float | None,
    held_out: Callable[[], None],
    store: SpilledDowns,
    fit: LayerFit,
    errors: torch.Tensor,
    norms: torch.Tensor,
) -> None:
    """Each slot's D^T into `store`: a fixed ridge, or the held-out choice (the held-out windows run inside, see
    the docstring; `errors`/`norms` the group's rows of the layer's held-out sums)."""
    if sums.hh is None or sums.hy is None:
        raise MoePruneError(f"--refit: MoE layer {sums.layer} saw no calibration tokens")
    if ridge is not None:
        held_out()
        for j in range(len(sums.anchors)):
            _keep(store, fit, least_squares_down(sums.hh[j].cpu().numpy(), sums.hy[j].cpu().numpy(), ridge), ridge)
        return
    values, scales = [], []
    for j in range(len(sums.anchors)):  # hh[j] <- Q, hy[j] <- Q^T hy: the decomposition in the sums' memory
        q, v, rotated, scale = eigen_fit(sums.hh[j], sums.hy[j])
        sums.hh[j].copy_(q)
        sums.hy[j].copy_(rotated)
        values.append(v)
        scales.append(scale)

    def score(row: int, h: torch.Tensor, p: torch.Tensor, y: torch.Tensor) -> None:
        g = h @ sums.hh[row]
        errors[row] += candidate_errors(g, p, y, values[row], sums.hy[row], scales[row])
        norms[row] += (p[:, 0] * y.square().sum(1)).sum().cpu()

    sums.scorer = score
    held_out()
    for j, i in enumerate(errors.argmin(dim=1).tolist()):
        _keep(store, fit, ridge_solution(sums.hh[j], values[j], sums.hy[j], scales[j], RIDGES[i]), RIDGES[i])


def _keep(store: SpilledDowns, fit: LayerFit, down: np.ndarray, ridge: float) -> None:
    """One solved slot: to the store (float32 on disk), its ridge and range into the layer's fit."""
    store.append(down)
    fit.ridges.append(ridge)
    fit.max_abs = max(fit.max_abs, float(np.abs(down).max()))
    fit.max_norm = max(fit.max_norm, float(np.linalg.norm(down)))
