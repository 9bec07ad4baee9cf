"""`sweep`: prune or merge to every combination from one profile, evaluate each, and rank them against random masks.

Combinations (`sweep.plan`): each criterion x direction x scope x ratio, each merge method x weights x refit x
scope x ratio, `random_seeds` random masks per ratio (the floor: the best of them) and the original. Each is
built by the real stages (`score` or `allocate` -> `prune`, or [`allocate --for merge` ->] `merge`) into the
work folder, evaluated by `eval`'s own `evaluate_model` (and `tasks.evaluate_tasks`), then deleted; only its
result line is kept (`sweep.folder`). The statistics are read once and never recomputed. Combinations the
statistics or the model cannot support (missing gradients, global selection of incomparable scores) are rows
marked skipped with the stage's reason; they are fatal only when nothing else is left.
"""

from __future__ import annotations

import gc
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moe_prune.artifacts.stats import Stats
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.errors import MoePruneError
from moe_prune.io.output import OutputError
from moe_prune.merging.registry import METHODS as METHODS
from moe_prune.merging.registry import get_method, weight_statistic
from moe_prune.runtime.data import Document, check_split_on
from moe_prune.runtime.skeleton import code_decision, parse_dtype
from moe_prune.scoring.selection import Budget
from moe_prune.specs.sweep import SweepSpec
from moe_prune.stages import evaluate, prune, score, tasks
from moe_prune.stages.sweep_checks import check_ratios, check_usable, sweep_criteria
from moe_prune.stages.sweep_search import merge_to_counts, searched
from moe_prune.stages.task_harness import quiet_lm_eval
from moe_prune.sweep.folder import SweepFolder, fingerprint
from moe_prune.sweep.plan import DIRECTIONS, REFITS, Combo, choice, combinations, command, parse_scopes
from moe_prune.sweep.plot import PLOT_NAME as PLOT_NAME
from moe_prune.sweep.plot import perplexity_plot as perplexity_plot
from moe_prune.sweep.results import Floor as Floor
from moe_prune.sweep.results import Row, SweepResult, floors, hopeless
from moe_prune.sweep.results import not_measured as not_measured
from moe_prune.sweep.results import ranked as ranked
from moe_prune.sweep.results import verdicts as verdicts

# progress(combinations done, total, the combination starting now or None at the end)
ProgressFn = Callable[[int, int, Combo | None], None]


def check(settings: SweepSpec) -> None:
    """Checks of the settings alone, before any file is read."""
    settings.check_tasks()
    choice(settings.directions, "--directions", DIRECTIONS)
    parse_scopes(settings.scopes)
    choice(settings.merge_refit, "--merge-refit", tuple(REFITS))
    for rule in settings.merge_weights:
        weight_statistic(rule)
    if settings.search_evals < 2:
        raise MoePruneError(f"--search-evals must be at least 2 (got {settings.search_evals})")
    if not settings.ratios or not all(0.0 < r < 1.0 for r in settings.ratios):
        raise MoePruneError(f"--ratios {list(settings.ratios)}: each ratio must be above 0 and below 1")
    if settings.random_seeds < 1:
        raise MoePruneError(f"--random-seeds must be at least 1 (got {settings.random_seeds}): they are the floor")
    if settings.seq_len < 2 or settings.batch_size < 1 or (settings.max_tokens is not None and settings.max_tokens < 1):
        raise MoePruneError("--seq-len must be at least 2, --batch-size and --max-tokens at least 1")
    parse_dtype(settings.dtype)
    check_split_on(settings.split_on)
    task_settings = tasks_of(settings)
    if task_settings is not None:
        tasks.validate(task_settings)


def tasks_of(settings: SweepSpec) -> tasks.TaskSettings | None:
    """--tasks and its options, the models loaded as for perplexity; None without --tasks."""
    if settings.tasks is None:
        return None
    s = settings
    return tasks.TaskSettings(
        tasks.parse_tasks(s.tasks), s.num_fewshot, s.limit, s.include_path, s.batch_size, s.dtype, s.device,
        s.trust_remote_code,
    )  # fmt: skip


def methods_of(settings: SweepSpec) -> tuple[str, ...]:
    """The merge methods: `all` is every registered one."""
    return tuple(METHODS.names()) if settings.merge_methods == ("all",) else settings.merge_methods


@dataclass
class Plan:
    """Everything validated before the first combination runs."""

    model: str
    ckpt: Checkpoint
    stats: Stats
    stats_name: str
    settings: SweepSpec
    combos: list[Combo]
    texts: list[Document]
    fingerprint: dict[str, Any]
    defaults: dict[str, str]
    manager: Any = None  # lm-eval's task manager with --tasks
    warnings: list[str] = field(default_factory=list)

    @property
    def experts(self) -> dict[int, int]:
        identity = self.ckpt.identity
        return {layer: identity.experts_in(layer) for layer in identity.moe_layers}


def prepare(model: str | Path, stats: str | Path, settings: SweepSpec) -> Plan:
    """Validate options, model, statistics, data and tasks; list the combinations. Nothing is written."""
    check(settings)
    criteria = sweep_criteria(settings.criteria)
    methods = [m for m in methods_of(settings) if get_method(m)]
    ckpt = Checkpoint.open(model)
    code_decision(ckpt, settings.trust_remote_code)  # refuses checkpoint code before any work
    loaded = Stats.load(Path(stats))
    loaded.identity.require_same(ckpt.identity, str(stats), str(ckpt.folder))
    check_ratios(ckpt, settings.ratios)
    check_usable(criteria, methods, loaded, ckpt, str(stats))
    texts = evaluate.heldout_documents(
        settings.data, settings.text_field, "train", settings.max_tokens, settings.split_on
    )
    task_settings = tasks_of(settings)
    manager = tasks.prepare(task_settings) if task_settings is not None else None
    s = settings
    combos = combinations(
        criteria, methods, s.ratios, s.directions, s.scopes, s.random_seeds,
        s.merge_seed, s.merge_weights, s.merge_refit, s.search_evals,
    )  # fmt: skip
    defaults = {c.name: c.direction for c in criteria}
    return Plan(str(model), ckpt, loaded, str(stats), s, combos, texts, _fingerprint(ckpt, stats, s), defaults, manager)


def run(
    model: str | Path,
    stats: str | Path,
    settings: SweepSpec | None = None,
    out: Path | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
) -> SweepResult:
    """Run (or resume, from `out`) the sweep; without `out` it works in a temporary folder removed at the end."""
    settings = settings or SweepSpec()
    plan = prepare(model, stats, settings)
    folder = SweepFolder.open(out, plan.fingerprint, force, (model, stats, settings.data))
    report = progress or (lambda done, total, combo: None)
    try:
        finished = folder.load()
        reused = sum(1 for c in plan.combos if c.key in finished)
        rows: list[Row] = []
        for index, combo in enumerate(plan.combos):
            report(index, len(plan.combos), combo)
            row = finished.get(combo.key)
            if row is None:
                row = _hopeless(plan, combo, rows) or _execute(plan, combo, folder.scratch)
                if row.status != "hopeless":  # depends on the other rows: decided again on every run
                    finished[combo.key] = row
                    folder.save(list(finished.values()))
            rows.append(row)
        report(len(plan.combos), len(plan.combos), None)
        result = SweepResult(
            out=folder.path if not folder.temporary else None,
            model=plan.model,
            stats=plan.stats_name,
            data=settings.data,
            fingerprint=plan.fingerprint,
            experts=plan.experts,
            top_k=plan.ckpt.config.top_k,
            ratios=settings.ratios,
            rows=rows,
            defaults=plan.defaults,
            tasks=tasks.parse_tasks(settings.tasks) if settings.tasks else [],
            reused=reused,
            warnings=list(dict.fromkeys(plan.warnings)),
        )
        folder.write_table(result.to_dict())
        return result
    except BaseException:
        folder.abandon()
        raise
    finally:
        folder.cleanup()


def _hopeless(plan: Plan, combo: Combo, rows: list[Row]) -> Row | None:
    if not plan.settings.prune_hopeless:
        return None
    reason = hopeless(combo, rows, floors(rows))
    return Row(combo, "hopeless", reason) if reason else None


def _execute(plan: Plan, combo: Combo, scratch: Path) -> Row:
    """Build the combination's checkpoint, evaluate it, delete it: its row.

    Whatever happens (a refused build too), the checkpoint is gone, and the models loaded for it (the evaluated
    one, an `allocate` search's) are collected now: a loaded transformers model sits in reference cycles, so
    it would otherwise wait for a full collection while the next combination loads its own.
    """
    target = scratch / "model"
    try:
        try:
            kept, folder = _build(plan, combo, target)
            gc.collect()  # what the build loaded (an allocate search's models) goes before the evaluation's
        except OutputError:  # a full disk is the run's failure, not the combination's
            raise
        except MoePruneError as exc:  # refused by score, prune or merge before anything was evaluated
            return Row(combo, "skipped", str(exc))
        row = Row(combo, "failed", kept=kept, command=command(combo, plan.model, plan.stats_name, kept))
        try:
            _measure(plan, row, folder)
        except MoePruneError as exc:  # e.g. non-finite logits: no perplexity, the worst row of its ratio
            if combo.kind == "original":
                raise  # the model itself cannot be evaluated (tokenizer, weights, code): nothing to compare with
            row.reason = str(exc)
        return row
    finally:
        shutil.rmtree(target, ignore_errors=True)  # also what a refused build left half-written
        gc.collect()


def _build(plan: Plan, combo: Combo, target: Path) -> tuple[dict[int, int], Path]:
    """(experts per MoE layer, checkpoint folder) of the combination, through the stages' own functions."""
    source = plan.ckpt.folder
    if combo.kind == "original":
        return plan.experts, source
    if combo.scope == "search":
        return searched(plan, combo, target)
    if combo.kind == "merge":
        counts = {layer: n - Budget(ratio=combo.ratio).drops(n, "per layer") for layer, n in plan.experts.items()}
        return merge_to_counts(plan, combo, target, counts), target
    mask, _ = score.score(
        plan.stats,
        source,
        combo.name,
        direction=combo.direction,  # type: ignore[arg-type]
        budget=Budget(ratio=combo.ratio),
        global_=combo.scope == "global",
        seed=combo.seed or 0,
        stats_name=plan.stats_name,
    )
    prune.run(source, mask, target, force=True, mask_name=combo.line)
    return {layer: len(kept) for layer, kept in mask.keep.items()}, target


def _measure(plan: Plan, row: Row, folder: Path) -> None:
    """Perplexity (and task metrics) of the checkpoint in `folder`, written into `row`."""
    s = plan.settings
    eval_settings = evaluate.Settings(s.seq_len, s.batch_size, s.max_tokens, s.dtype, s.device, s.trust_remote_code)
    measured, _, warnings = evaluate.evaluate_model(
        str(folder), Checkpoint.open(folder), row.combo.line, plan.texts, eval_settings, lambda *a: None, s.data
    )
    plan.warnings += warnings
    if plan.manager is not None:
        task_settings = tasks_of(s)
        assert task_settings is not None
        with quiet_lm_eval():
            result = tasks.evaluate_tasks(
                str(folder), folder, row.combo.line, plan.manager, task_settings, lambda *a: None
            )
        row.tasks = {
            task: {"metric": f"{m},{f}", "value": value, "stderr": stderr}
            for task in result.results
            for m, f, value, stderr in result.metrics(task)[:1]
        }
    row.status, row.perplexity, row.nll = "done", measured.perplexity, measured.nll
    row.tokens_scored, row.active_params, row.bytes_on_disk = (
        measured.tokens_scored,
        measured.params.active,
        measured.bytes_on_disk,
    )


def _fingerprint(ckpt: Checkpoint, stats: str | Path, settings: SweepSpec) -> dict[str, Any]:
    """What every result depends on; the combinations are not in it (a rerun may add criteria or ratios)."""
    names = ("text_field", "split_on", "seq_len", "batch_size", "max_tokens", "dtype", "device", "merge_seed")
    evaluation: dict[str, Any] = {name: getattr(settings, name) for name in names}
    task_settings = tasks_of(settings)
    if task_settings is not None:
        evaluation["tasks"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(task_settings).items()}
    return fingerprint(ckpt, stats, settings.data, evaluation)
