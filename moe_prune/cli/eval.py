"""Perplexity, sizes, expert load, FLOPs per token and task accuracy (--tasks) of a model, optionally vs a baseline."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

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
    human_bytes,
    out_console,
    parse_device_map,
    print_json,
    user_errors,
    warn,
)
from moe_prune.errors import MoePruneError
from moe_prune.stages.common import check_not_input, check_writable

if TYPE_CHECKING:
    from moe_prune.stages.evaluate import EvalResult, LayerLoad, ModelEval
    from moe_prune.stages.tasks import TasksResult

COMPACT_EXPERTS = 16  # wider layers show min / median / max instead of every expert's count


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

    from moe_prune.stages import evaluate as stage
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
    bar = LazyBar(*columns)

    def advance(label: str, done: int, total: int) -> None:
        bar.update(label, f"evaluating {label} (batches)", completed=done, total=total)

    try:
        result = stage.run(
            model,
            data,
            seq_len=seq_len,
            batch_size=batch_size,
            max_tokens=max_tokens,
            baseline=baseline,
            progress=advance,
            text_field=text_field,
            split=split,
            split_on=split_on,
            dtype=dtype,
            device=device,
            trust_remote_code=trust_remote_code,
            engine=engine,
        )
    finally:
        bar.stop()
    for message in result.warnings:
        warn(message)
    if task_result is not None:
        _report_tasks(task_result, json_output, result, (log_samples, force, inputs))
        return
    if json_output:
        print_json(result.to_dict())
        return
    _print_perplexity(result)


def _print_perplexity(result: EvalResult) -> None:
    m, b = result.model, result.baseline
    out_console.print(
        f"[bold]{m.model}[/] on {result.data}: {m.sequences} sequences × {m.seq_len} tokens, engine {m.engine}",
        highlight=False,
    )
    if b is not None:
        out_console.print(f"baseline: [bold]{b.model}[/]", highlight=False)
    out_console.print(summary_table(result))
    out_console.print(
        "FLOPs/token ≈ 2 × active matmul params (input embedding excluded, attention scores ignored)", style="dim"
    )
    if not m.load:  # vLLM's fused-MoE kernels expose no routing
        out_console.print(f"expert load: not recorded by engine {m.engine} (--engine transformers records it)")
        return
    out_console.print(load_table(m))
    out_console.print("max/mean 1.00 and entropy (H/log E) 1.000 mean a perfectly even load", style="dim")


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
        _print_perplexity(result)
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


def task_tables(result: TasksResult) -> list[Table]:
    """One table per task: metric, value, stderr; baseline and change columns with a baseline."""
    m, b = result.model, result.baseline
    tables = []
    for task in m.results:
        rows = m.metrics(task)
        if not rows:
            continue
        shots = m.n_shot.get(task)
        title = f"{task}" + (
            f" ({shots}-shot, {m.n_samples.get(task, {}).get('effective', '?')} docs)" if shots is not None else ""
        )
        table = Table(title=title, title_justify="left")
        for name in ("metric", "filter", "value", "stderr", *(("baseline", "stderr", "change") if b else ())):
            table.add_column(name, justify="left" if name in ("metric", "filter") else "right")
        base = {(metric, filt): (v, e) for metric, filt, v, e in b.metrics(task)} if b else {}
        for metric, filt, value, stderr in rows:
            cells = [metric, filt, f"{value:.4f}", "" if stderr is None else f"±{stderr:.4f}"]
            if b:
                bv, be = base.get((metric, filt), (None, None))
                cells += [
                    "" if bv is None else f"{bv:.4f}",
                    "" if be is None else f"±{be:.4f}",
                    "" if bv is None else f"{value - bv:+.4f}",
                ]
            table.add_row(*cells)
        tables.append(table)
    return tables


def human_count(n: float) -> str:
    """1234567 -> '1.23M': parameter and FLOP counts at a glance."""
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000 or unit == "T":
            return f"{n:.0f}" if unit == "" else f"{n:.2f}{unit}"
        n /= 1000
    return f"{n:.2f}T"


def _delta(model: float, baseline: float, fmt: Any) -> str:
    sign = "+" if model >= baseline else "-"
    relative = f" ({(model / baseline - 1) * 100:+.1f}%)" if baseline else ""
    return f"{sign}{fmt(abs(model - baseline))}{relative}"


def _rows(m: ModelEval) -> list[tuple[str, float, Any, bool]]:
    """(label, value, formatter, compare with the baseline) for each summary row."""
    p = m.params
    return [
        ("perplexity", m.perplexity, lambda v: f"{v:.3f}", True),
        ("tokens scored", m.tokens_scored, lambda v: f"{v:,}", False),
        ("experts per layer / top-k", m.experts_per_layer, lambda v: f"{v} / {m.top_k}", False),
        ("params total", p.total, human_count, True),
        ("params in routed experts", p.routed_experts, human_count, True),
        ("params active per token", p.active, human_count, True),
        ("FLOPs per token", p.flops_per_token, human_count, True),
        ("bytes on disk", m.bytes_on_disk, human_bytes, True),
        ("bytes in memory", m.bytes_in_memory, human_bytes, True),
    ]


def summary_table(result: EvalResult) -> Table:
    """One row per metric; baseline and change columns when a baseline was evaluated."""
    m, b = result.model, result.baseline
    table = Table()
    for name in ("metric", "model", *(("baseline", "change") if b else ())):
        table.add_column(name, justify="left" if name == "metric" else "right")
    base_rows = _rows(b) if b is not None else [None] * len(_rows(m))
    for (label, value, fmt, compare), base in zip(_rows(m), base_rows, strict=True):
        cells = [label, fmt(value)]
        if base is not None:
            cells += [base[2](base[1]), _delta(value, base[1], fmt) if compare else ""]
        table.add_row(*cells)
    return table


def _compact(load: LayerLoad) -> str:
    """Every expert's count (as `original id:count` once pruned), or a summary for wide layers."""
    counts = load.counts
    if len(counts) > COMPACT_EXPERTS:
        ordered = sorted(counts)
        return f"min {ordered[0]} · median {ordered[len(ordered) // 2]} · max {ordered[-1]}"
    if load.original_ids == list(range(len(counts))):
        return " ".join(str(c) for c in counts)
    return " ".join(f"{i}:{c}" for i, c in zip(load.original_ids, counts, strict=True))


def load_table(m: ModelEval) -> Table:
    """Expert load per MoE layer: how evenly the router spreads its top-k choices."""
    table = Table(title=f"expert load (top-{m.top_k} selections per expert)", title_justify="left")
    for name, justify in (("layer", "right"), ("experts", "right"), ("max/mean", "right"), ("entropy", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    table.add_column("tokens per expert")
    for load in m.load:
        table.add_row(
            str(load.layer),
            str(load.experts),
            f"{load.max_over_mean:.2f}",
            f"{load.entropy:.3f}",
            _compact(load),
        )
    return table
