"""Perplexity, size, expert load balance and FLOPs per token of a model (optionally against a baseline)."""

from __future__ import annotations

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
    TrustOpt,
    human_bytes,
    out_console,
    parse_device_map,
    print_json,
    user_errors,
    warn,
)

if TYPE_CHECKING:
    from moe_prune.stages.evaluate import EvalResult, LayerLoad, ModelEval

COMPACT_EXPERTS = 16  # wider layers show min / median / max instead of every expert's count


@user_errors
def evaluate(
    model: ModelArg = DEFAULT_MODEL,
    data: Annotated[
        str, typer.Option("--data", "-d", help="Text file (.txt/.jsonl/.json/.parquet/.csv) or hub dataset id.")
    ] = DEFAULT_DATA,
    text_field: Annotated[str, typer.Option(help="Field/column holding the text in structured data.")] = "text",
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
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from moe_prune.stages import evaluate as stage

    device = parse_device_map(device_map, device)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
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
            dtype=dtype,
            device=device,
            trust_remote_code=trust_remote_code,
        )
    finally:
        bar.stop()
    for message in result.warnings:
        warn(message)
    if json_output:
        print_json(result.to_dict())
        return
    m, b = result.model, result.baseline
    out_console.print(
        f"[bold]{m.model}[/] on {result.data}: {m.sequences} sequences × {m.seq_len} tokens", highlight=False
    )
    if b is not None:
        out_console.print(f"baseline: [bold]{b.model}[/]", highlight=False)
    out_console.print(summary_table(result))
    out_console.print(
        "FLOPs/token ≈ 2 × active matmul params (input embedding excluded, attention scores ignored)", style="dim"
    )
    out_console.print(load_table(m))
    out_console.print("max/mean 1.00 and entropy (H/log E) 1.000 mean a perfectly even load", style="dim")


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
