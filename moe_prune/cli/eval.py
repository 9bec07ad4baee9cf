"""Perplexity, sizes, expert load, FLOPs per token and task accuracy (--tasks) of a model, optionally vs a baseline."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from moe_prune.cli.common import (
    DEFAULT_DATA,
    DEFAULT_MODEL,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    LazyBar,
    ModelArg,
    SplitOnOpt,
    TrustOpt,
    out_console,
    parse_device_map,
    print_json,
    user_errors,
    warn,
)
from moe_prune.cli.eval_tables import print_perplexity, task_tables
from moe_prune.errors import MoePruneError
from moe_prune.stages.common import check_not_input, check_writable

if TYPE_CHECKING:
    from moe_prune.stages.eval_results import EvalResult
    from moe_prune.stages.tasks import TasksResult


@user_errors
def evaluate(
    model: ModelArg = DEFAULT_MODEL,
    data: Annotated[
        str,
        typer.Option(
            "--data",
            "-d",
            help="Text file (.txt/.jsonl/.json/.parquet/.csv; chat 'messages' records through the model's chat "
            "template) or hub dataset id.",
        ),
    ] = DEFAULT_DATA,
    text_field: Annotated[str, typer.Option(help="Field/column holding the text in structured data.")] = "text",
    split: Annotated[str, typer.Option(help="Split of a hub dataset (streamed).")] = "train",
    split_on: SplitOnOpt = "none",
    seq_len: Annotated[int, typer.Option(help="Tokens per evaluated sequence (capped at the model's context).")] = 256,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 8,
    max_tokens: Annotated[int | None, typer.Option(help="Evaluate at most this many tokens of the data.")] = None,
    baseline: Annotated[
        str | None, typer.Option(help="Also evaluate this model (e.g. the unpruned original) and compare.")
    ] = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    device_map: DeviceMapOpt = None,
    trust_remote_code: TrustOpt = False,
    json_output: JsonOpt = False,
    tasks: Annotated[
        str | None,
        typer.Option(
            "--tasks",
            help="Comma-separated lm-eval tasks/groups to score (e.g. demo: the demo model's offline suite). "
            "Needs moe-prune\\[tasks].",
        ),
    ] = None,
    num_fewshot: Annotated[
        int | None, typer.Option(help="Few-shot demonstrations per task question (default: each task's own).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Score at most this many documents per task.")] = None,
    include_path: Annotated[
        Path | None,
        typer.Option(
            help="Folder of your own lm-eval task YAMLs, usable by name in --tasks (their code, such as "
            "!function, runs only with --trust-remote-code)."
        ),
    ] = None,
    log_samples: Annotated[
        Path | None, typer.Option(help="Write lm-eval's per-sample records (JSONL) to this file.")
    ] = None,
    perplexity: Annotated[
        bool, typer.Option("--perplexity/--no-perplexity", help="Also measure perplexity, sizes and expert load.")
    ] = True,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --log-samples file.")] = False,
    engine: Annotated[
        str,
        typer.Option(
            help="transformers, or vllm: perplexity from vLLM's prompt log-probs on the same token windows and "
            "--tasks through lm-eval's vLLM backend (needs vLLM installed; no expert load)."
        ),
    ] = "transformers",
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from moe_prune.stages.evaluate import check_engine

    device = parse_device_map(device_map, device)
    check_engine(engine, device)  # a missing vLLM is one line before any task or data is read
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    task_result = None
    inputs = _local_inputs((model, baseline, data, include_path))  # never replaced by --log-samples
    if tasks is None:
        if not perplexity:
            raise MoePruneError("--no-perplexity leaves nothing to evaluate without --tasks")
        if any(v is not None for v in (num_fewshot, limit, include_path, log_samples)):
            raise MoePruneError("--num-fewshot, --limit, --include-path and --log-samples apply to --tasks only")
    else:
        if log_samples is not None:  # refused before any work, like every output
            _check_samples(log_samples, force, inputs)
        task_result = _run_tasks(
            model,
            tasks,
            baseline,
            num_fewshot,
            limit,
            include_path,
            log_samples,
            batch_size,
            dtype,
            device,
            trust_remote_code,
            columns,
            engine,
        )
        if not perplexity:
            _report_tasks(task_result, json_output, None, (log_samples, force, inputs))
            return
    result = _run_perplexity(
        columns,
        model,
        data,
        seq_len=seq_len,
        batch_size=batch_size,
        max_tokens=max_tokens,
        baseline=baseline,
        text_field=text_field,
        split=split,
        split_on=split_on,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        engine=engine,
    )
    for message in result.warnings:
        warn(message)
    if task_result is not None:
        _report_tasks(task_result, json_output, result, (log_samples, force, inputs))
        return
    if json_output:
        print_json(result.to_dict())
        return
    print_perplexity(result)


def _run_perplexity(columns: tuple[Any, ...], model: str, data: str, **options: Any) -> EvalResult:
    """Perplexity, sizes and expert load of the model (and baseline), one progress bar per model."""
    from moe_prune.stages import evaluate as stage

    bar = LazyBar(*columns)

    def advance(label: str, done: int, total: int) -> None:
        bar.update(label, f"evaluating {label} (batches)", completed=done, total=total)

    try:
        return stage.run(model, data, progress=advance, **options)
    finally:
        bar.stop()


def _run_tasks(
    model: str,
    spec: str,
    baseline: str | None,
    num_fewshot: int | None,
    limit: int | None,
    include_path: Path | None,
    log_samples: Path | None,
    batch_size: int,
    dtype: str,
    device: str,
    trust_remote_code: bool,
    columns: tuple[Any, ...],
    engine: str,
) -> TasksResult:
    """Task accuracy first: a wrong task name or task file fails before any perplexity work."""
    from moe_prune.stages import tasks as stage
    from moe_prune.stages.task_harness import require_lm_eval

    require_lm_eval()
    settings = stage.TaskSettings(
        stage.parse_tasks(spec),
        num_fewshot,
        limit,
        include_path,
        batch_size,
        dtype,
        device,
        trust_remote_code,
        engine=engine,
    )
    stage.validate(settings)
    with LazyBar(*columns) as bar:

        def advance(label: str, done: int, total: int, kind: str) -> None:
            bar.update(label, f"{label}: {kind} requests", completed=done, total=total)

        return stage.run(model, settings, baseline, advance)


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
