"""The tables `eval` prints: perplexity and sizes against a baseline, expert load, task metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.table import Table

from moe_prune.cli.common import human_bytes, out_console

if TYPE_CHECKING:
    from moe_prune.stages.eval_results import EvalResult, LayerLoad, ModelEval
    from moe_prune.stages.tasks import TasksResult


COMPACT_EXPERTS = 16  # wider layers show min / median / max instead of every expert's count


def print_perplexity(result: EvalResult) -> None:
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
