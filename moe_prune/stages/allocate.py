"""`allocate`: search how many experts each MoE layer keeps, the criterion's order inside each layer.

Library entry point: `allocate(stats, model, AllocateSpec(...), data) -> (DropMask, AllocationReport)`.
Inputs, budget and constraints are checked before the model is loaded. The original's predictions on
calibration windows (those `profile` read, from the statistics' provenance, or `data`) are computed once;
each candidate runs the same loaded model with its dropped experts out of routing (`allocation.masking`).
The search starts from the layer-wise (uniform) counts and from a global ranking, then exchanges experts
between layers while the objective improves (`allocation.search`). The mask's provenance records the
objective of every start and of the result, and the evaluations spent.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moe_prune.allocation import plan
from moe_prune.allocation.blocks import MergedBlocks
from moe_prune.allocation.plot import counts_figure as counts_figure
from moe_prune.allocation.search import Counts, search
from moe_prune.architectures.config import ModelConfig
from moe_prune.artifacts.mask import DropMask
from moe_prune.artifacts.stats import Stats
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.checkpoint.surgery import KeyMatcher
from moe_prune.errors import MoePruneError
from moe_prune.runtime.skeleton import code_decision
from moe_prune.scoring import get_criterion
from moe_prune.scoring.registry import Criterion, Inputs, evaluate
from moe_prune.scoring.selection import Budget
from moe_prune.specs.allocate import AllocateSpec
from moe_prune.stages.allocate_choices import SEQUENTIAL_REFUSAL as SEQUENTIAL_REFUSAL
from moe_prune.stages.allocate_choices import check_numbers
from moe_prune.stages.allocate_choices import choices as choices
from moe_prune.stages.allocate_data import Calibration, calibration_windows
from moe_prune.stages.allocate_merge import MergeAllocation as MergeAllocation
from moe_prune.stages.allocate_merge import MergeTarget as MergeTarget
from moe_prune.stages.allocate_merge import merge_allocation, merged_models
from moe_prune.stages.allocate_record import AllocationReport as AllocationReport
from moe_prune.stages.allocate_record import drop_mask, report_of
from moe_prune.stages.allocate_topk import TopKJudge, check_options, search_top_k
from moe_prune.stages.evaluate import _is_expert_weight
from moe_prune.stages.score import _identity, _vocab

DEFAULT_OBJECTIVE = "kl"  # tracked held-out perplexity best on the demo (README, allocate)
GLOBAL_FALLBACK = "soft-counts"  # ranks experts across layers when the criterion's scores are not comparable
MERGE_RANKING = "usage-frequency"  # --for merge without soft counts: ranks by the hard counts merge reads


def allocate(
    stats: str | Path | None,
    model: str | Path,
    spec: AllocateSpec = AllocateSpec(),
    data: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[DropMask | MergeAllocation, AllocationReport]:
    """Search per-layer counts for `spec.criterion` under the spec's budget (`--ratio`/`--keep` of the searched
    layers' experts, or `--bytes`), candidates judged on `data` (None: the windows the statistics were profiled on).
    With `spec.for_` "merge", the counts are for `merge` with that method (`stages.allocate_merge`): candidates are
    judged as merged models, the criterion only ranks experts across layers for the global start (None: one
    the statistics hold, `merge_ranking`), and the result is a `MergeAllocation` instead of a drop mask."""
    start = time.perf_counter()
    p = _prepared(stats, model, spec, data)

    from moe_prune.allocation.evaluator import Evaluator  # torch and transformers: only once the inputs are good

    model_obj, windows, data_warnings = calibration_windows(p.ckpt, p.stats, p.calibration, p.stats_name)
    p.warnings.extend(data_warnings)
    config = p.ckpt.config
    judge = Evaluator(model_obj, config, windows, p.calibration.batch_size, p.calibration.top)
    measured: dict[Counts, tuple[float, float]] = {}
    with ExitStack() as stack:
        if p.merge is None:
            candidate = lambda counts: judge.masks.dropped(p.table.drops(counts))  # noqa: E731
        else:
            candidate = _merged(
                stack, model_obj, config, model, p.stats, p.stats_name, p.merge, p.layers, p.calibration
            )

        def value(counts: Counts) -> float:
            measured[counts] = judge.measure_in(candidate(counts))
            esap, kl = measured[counts]
            return esap if spec.objective == "esap" else -kl

        trace = search(p.space, p.starts, value, spec.budget_evals, spec.seed, progress)
        top_k = None
        if p.active_ratio is not None:
            counts_candidate = lambda: candidate(trace.best)  # noqa: E731
            topk_judge = TopKJudge(model_obj, config, judge.measure_in, counts_candidate, windows[0], spec.objective)
            top_k = search_top_k(
                topk_judge, p.layers, trace.best, p.active_ratio, spec.budget_evals, spec.seed, progress
            )
    report = report_of(
        p.criterion, spec.objective, p.layers, p.starts, trace, measured, judge.positions, p.global_from, p.warnings
    )
    report.top_k = top_k.to_dict() if top_k is not None else None
    report.seconds = time.perf_counter() - start
    return _result(p, spec, trace, report, tuple(top_k.top_k) if top_k is not None else None, model)


@dataclass
class _Prepared:
    """What the search needs, every input read and checked before the model is loaded."""

    merge: MergeTarget | None
    active_ratio: float | None
    budget: Budget | int
    calibration: Calibration
    stats_name: str
    stats: Stats
    criterion: str
    ckpt: Checkpoint
    identity: Any
    layers: plan.Layers
    space: plan.Space
    table: plan.DropTable
    starts: dict[str, Counts]
    global_from: str | None
    warnings: list[str]


def _prepared(stats: str | Path | None, model: str | Path, spec: AllocateSpec, data: Sequence[str] | None) -> _Prepared:
    """The spec's choices, the statistics, the checkpoint, the candidates' space and the search's starts."""
    merge, active_ratio, budget = choices(stats, spec)
    s = spec
    calibration = Calibration(
        data, s.samples, s.seq_len, s.batch_size, s.top_logprobs, s.dtype, s.device, s.trust_remote_code
    )
    check_numbers(spec.objective, spec.budget_evals, calibration)
    stats_name = str(stats)
    loaded = Stats.load(Path(stats_name))
    crit = get_criterion(spec.criterion or merge_ranking(loaded, merge))
    ckpt = Checkpoint.open(model)
    code_decision(ckpt, calibration.trust_remote_code)  # refuses checkpoint code before any work
    identity = _identity(crit, loaded, ckpt, stats_name)
    warnings = merge.check(loaded, ckpt, stats_name, calibration.trust_remote_code) if merge is not None else []
    layers = _layers(ckpt.config, identity.moe_layers, spec.skip_layers or ())
    space, limit = _space(ckpt, layers, budget, spec.min_per_layer)
    if active_ratio is not None:
        check_options(ckpt.config, layers, active_ratio, merge is not None)
    inputs = Inputs(identity, loaded, None, spec.seed, _vocab(loaded, ckpt))
    scores, usage, values = evaluate(crit, inputs) if not crit.weights else _with_weights(crit, inputs, ckpt)
    table = plan.DropTable(layers, crit.direction, scores, usage, values)
    starts, global_from = _starts(crit, loaded, inputs, scores, space, layers, limit, warnings)
    return _Prepared(
        merge, active_ratio, budget, calibration, stats_name, loaded, crit.name, ckpt, identity, layers, space,
        table, starts, global_from, warnings,
    )  # fmt: skip


def _result(
    p: _Prepared,
    spec: AllocateSpec,
    trace: Any,
    report: AllocationReport,
    top_k: tuple[int, ...] | None,
    model: str | Path,
) -> tuple[DropMask | MergeAllocation, AllocationReport]:
    """The drop mask (or, --for merge, the counts to merge to) with the allocation's record."""
    facts = {"budget_evals": spec.budget_evals, "seed": spec.seed, "min_per_layer": spec.min_per_layer}
    facts["skip_layers"] = sorted(spec.skip_layers or ())
    if p.merge is not None:
        keep = dict(zip(p.layers.numbers, trace.best, strict=True))
        return merge_allocation(p.merge, keep, report, p.budget, p.calibration, facts, p.stats_name, model), report
    mask = drop_mask(p.identity, p.layers, p.table, trace, report, p.budget, p.calibration, facts, p.stats_name, top_k)
    mask.validate_groups(p.layers.n_group, "mask")
    return mask, report


def _space(
    ckpt: Checkpoint, layers: plan.Layers, budget: Budget | int, min_per_layer: int | None
) -> tuple[plan.Space, Budget | int]:
    """The counts allowed and the limit on them: a Budget counts experts, bytes count each layer's expert bytes."""
    if isinstance(budget, Budget):
        costs, limit = (1,) * len(layers.numbers), budget
    else:
        costs, limit = _costs(ckpt, layers), bytes_budget(ckpt, layers, budget)
    return plan.space(layers, min_per_layer, costs, limit), limit


def _merged(
    stack: ExitStack,
    model_obj: Any,
    config: ModelConfig,
    model: str | Path,
    loaded: Stats,
    stats_name: str,
    merge: MergeTarget,
    layers: plan.Layers,
    calibration: Calibration,
) -> Callable[[Counts], Any]:
    """`--for merge` candidates: each count's merged blocks swapped into the loaded model (`stack` closes
    them: leaving it deletes the spilled blocks)."""
    build = stack.enter_context(merged_models(model, loaded, stats_name, merge, layers, calibration))
    blocks = MergedBlocks(model_obj, config, layers.numbers, layers.searched, build)
    return stack.enter_context(blocks).swapped


def _starts(
    crit: Criterion,
    loaded: Stats,
    inputs: Inputs,
    scores: Any,
    space: plan.Space,
    layers: plan.Layers,
    limit: Budget | int,
    warnings: list[str],
) -> tuple[dict[str, Counts], str | None]:
    """The search's starting counts: uniform, and global when some statistic ranks experts across layers
    (its name returned; None, with a warning, when none does)."""
    starts: dict[str, Counts] = {"uniform": plan.uniform(space, layers, limit)}
    global_from = _global_source(crit, loaded, layers)
    if global_from is None:
        warnings.append(
            "no global start: the criterion's scores are not comparable across layers and the "
            f"statistics hold no {GLOBAL_FALLBACK}, or routing is grouped"
        )
    else:
        ranking = scores if global_from == crit.name else evaluate(get_criterion(global_from), inputs)[0]
        direction = crit.direction if global_from == crit.name else get_criterion(global_from).direction
        starts["global"] = plan.global_counts(space, layers, ranking, direction)
    return starts, global_from


def _layers(config: Any, numbers: list[int], skip: Sequence[int]) -> plan.Layers:
    unknown = sorted(set(skip) - set(numbers))
    if unknown:
        raise MoePruneError(f"--skip-layers {', '.join(map(str, unknown))}: not MoE layers ({numbers})")
    if set(numbers) <= set(skip):
        raise MoePruneError("--skip-layers leaves no MoE layer to search")
    return plan.Layers(
        tuple(numbers),
        tuple(config.experts_in_layer(n) for n in numbers),
        tuple(config.top_k_in_layer(n) for n in numbers),
        tuple(n not in set(skip) for n in numbers),
        config.n_group,
    )


def _costs(ckpt: Checkpoint, layers: plan.Layers) -> tuple[int, ...]:
    """Bytes of one routed expert per MoE layer (its share of the layer's expert tensors on disk)."""
    matcher = KeyMatcher(ckpt.config.adapter)
    per_layer = dict.fromkeys(layers.numbers, 0)
    for info in ckpt.tensors:
        key = matcher.classify(info.name)
        if key is not None and key.layer in per_layer and _is_expert_weight(key, info.name, matcher):
            per_layer[key.layer] += info.nbytes
    return tuple(-(-per_layer[n] // e) for n, e in zip(layers.numbers, layers.experts, strict=True))


def bytes_budget(ckpt: Checkpoint, layers: plan.Layers, size: int) -> int:
    """--bytes SIZE as a bound on the routed experts' bytes: SIZE less everything else in the checkpoint."""
    costs = _costs(ckpt, layers)
    experts = sum(c * n for c, n in zip(costs, layers.experts, strict=True))
    rest = ckpt.total_bytes() - experts
    if size <= rest:
        raise MoePruneError(f"--bytes {size:,} is not more than the {rest:,} bytes outside the routed experts")
    return size - rest


def _with_weights(crit: Any, inputs: Inputs, ckpt: Checkpoint) -> tuple[np.ndarray, Any, Any]:
    from moe_prune.checkpoint.expert_weights import ExpertWeights

    inputs.weights = ExpertWeights(ckpt, None)
    return evaluate(crit, inputs)


def merge_ranking(stats: Stats, merge: MergeTarget | None) -> str:
    """--for merge without --criterion: rank experts for the global start by what the statistics hold.

    Soft counts when profiled, else usage frequency from the hard counts every merge method reads
    (`profile --for uncurl` records hard_counts, not soft_counts).
    """
    if merge is None:
        raise MoePruneError("pass --criterion NAME (see `moe-prune score --list`)")
    return GLOBAL_FALLBACK if "soft_counts" in stats.arrays else MERGE_RANKING


def _global_source(crit: Any, stats: Stats, layers: plan.Layers) -> str | None:
    """The criterion ranking experts across layers: its own when comparable, else soft counts when profiled."""
    if layers.n_group > 1:
        return None
    if crit.global_ok:
        return crit.name
    return GLOBAL_FALLBACK if "soft_counts" in stats.arrays else None
