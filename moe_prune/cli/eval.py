"""Perplexity, sizes, expert load, FLOPs per token and task accuracy (--tasks) of a model, optionally vs a baseline."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe_prune.cli.common import (
    DEFAULT_MODEL,
    JsonOpt,
    LazyBar,
    ModelArg,
    out_console,
    print_json,
    user_errors,
    warn,
)
from moe_prune.cli.eval_tables import print_perplexity, task_tables
from moe_prune.cli.spec_options import takes_spec
from moe_prune.errors import MoePruneError
from moe_prune.specs.eval import EvalSpec
from moe_prune.stages.common import check_not_input, check_writable

if TYPE_CHECKING:
    from moe_prune.stages.eval_results import EvalResult
    from moe_prune.stages.tasks import TasksResult


@user_errors
@takes_spec(EvalSpec, "spec")
def evaluate(
    model: ModelArg = DEFAULT_MODEL,
    *,
    spec: EvalSpec,  # one option per field (cli/spec_options.py)
    json_output: JsonOpt = False,
) -> None:
    from moe_prune.stages.evaluate import check_engine

    check_engine(spec.engine, spec.device)  # a missing vLLM is one line before any task or data is read
    inputs = _local_inputs((model, spec.baseline, spec.data, spec.include_path))  # never replaced by --log-samples
    samples = (spec.log_samples, spec.force, inputs)
    task_result = None
    if spec.sequential and spec.tasks is not None:
        raise MoePruneError("--sequential measures perplexity layer by layer; --tasks runs lm-eval on the whole model")
    if spec.tasks is None:
        if not spec.perplexity:
            raise MoePruneError("--no-perplexity leaves nothing to evaluate without --tasks")
        if any(v is not None for v in (spec.num_fewshot, spec.limit, spec.include_path, spec.log_samples)):
            raise MoePruneError("--num-fewshot, --limit, --include-path and --log-samples apply to --tasks only")
    else:
        if spec.log_samples is not None:  # refused before any work, like every output
            _check_samples(spec.log_samples, spec.force, inputs)
        task_result = _run_tasks(model, spec)
        if not spec.perplexity:
            _report_tasks(task_result, json_output, None, samples)
            return
    result = _run_perplexity(model, spec)
    for message in result.warnings:
        warn(message)
    if task_result is not None:
        _report_tasks(task_result, json_output, result, samples)
        return
    if json_output:
        print_json(result.to_dict())
        return
    print_perplexity(result)


def _columns() -> tuple[Any, ...]:
    """Each progress bar: what runs, batches or requests done of all, time left."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    return TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()


def _run_perplexity(model: str, spec: EvalSpec) -> EvalResult:
    """Perplexity, sizes and expert load of the model (and baseline), one progress bar per model."""
    from moe_prune.stages import evaluate as stage

    bar = LazyBar(*_columns())

    def advance(label: str, done: int, total: int) -> None:
        bar.update(label, f"evaluating {label} (batches)", completed=done, total=total)

    s = spec
    try:
        return stage.run(
            model, s.data, s.seq_len, s.batch_size, s.max_tokens, s.baseline, advance, text_field=s.text_field,
            split=s.split, split_on=s.split_on, dtype=s.dtype, device=s.device,
            trust_remote_code=s.trust_remote_code, engine=s.engine, sequential=s.sequential,
            buffer_memory=s.buffer_memory, expert_memory=s.expert_memory,
        )  # fmt: skip
    finally:
        bar.stop()


def _run_tasks(model: str, spec: EvalSpec) -> TasksResult:
    """Task accuracy first: a wrong task name or task file fails before any perplexity work."""
    from moe_prune.stages import tasks as stage
    from moe_prune.stages.task_harness import require_lm_eval

    require_lm_eval()
    assert spec.tasks is not None
    s = spec
    settings = stage.TaskSettings(
        stage.parse_tasks(s.tasks), s.num_fewshot, s.limit, s.include_path, s.batch_size, s.dtype, s.device,
        s.trust_remote_code, engine=s.engine,
    )  # fmt: skip
    stage.validate(settings)
    with LazyBar(*_columns()) as bar:

        def advance(label: str, done: int, total: int, kind: str) -> None:
            bar.update(label, f"{label}: {kind} requests", completed=done, total=total)

        return stage.run(model, settings, s.baseline, advance)


def _check_samples(path: Path, force: bool, inputs: tuple[str | Path, ...]) -> None:
    """--log-samples is an output like any other: its folder exists, an existing file needs --force, never an input."""
    if not path.parent.is_dir():
        raise MoePruneError(f"--log-samples {path}: folder {path.parent} does not exist")
    check_writable(path, force, "file")
    check_not_input(path, inputs)


def _local_inputs(inputs: tuple[str | Path | None, ...]) -> tuple[str | Path, ...]:
    """The inputs as files on disk (`demo` names the shipped model's folder)."""
    from moe_prune.stages.common import DEMO_ALIAS, DEMO_MODEL_DIR

    return tuple(
        DEMO_MODEL_DIR if str(given) == DEMO_ALIAS and not Path(given).is_dir() else given
        for given in inputs
        if given is not None
    )


def _report_tasks(
    tasks: TasksResult,
    json_output: bool,
    result: EvalResult | None,
    samples: tuple[Path | None, bool, tuple[str | Path, ...]],
) -> None:
    """Writes --log-samples (`samples`: the path, --force, the inputs it must not be), then the JSON document
    or the tables (perplexity ones first when measured)."""
    from moe_prune.stages.tasks import write_samples

    log_samples, force, inputs = samples
    if log_samples is not None:
        written = write_samples(tasks, log_samples, force, inputs)
        if not json_output:
            out_console.print(f"{written} per-sample records written to {log_samples}", style="dim", highlight=False)
    if json_output:
        print_json({**(result.to_dict() if result is not None else {}), "tasks": tasks.to_dict()})
        return
    if result is not None:
        print_perplexity(result)
    for table in task_tables(tasks):
        out_console.print(table)
    config = tasks.model.config
    out_console.print(
        f"lm-eval {config.get('lm_eval_version')} · engine {config.get('engine')} · limit {config.get('limit')} · "
        f"few-shot {config.get('num_fewshot') if config.get('num_fewshot') is not None else 'task default'} · "
        f"seed {config['seeds']['random_seed']}",
        style="dim",
        highlight=False,
    )
