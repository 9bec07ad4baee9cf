"""What `sweep` prints: the ranked table with the random floor among the rows, verdicts, the recommendation."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from moe_prune.cli.common import out_console

if TYPE_CHECKING:
    from moe_prune.stages.sweep import Floor, Row, SweepResult


def report(result: SweepResult, plot: Path | None) -> None:
    from moe_prune.stages.sweep import not_measured, verdicts

    original = next((r for r in result.rows if r.combo.kind == "original"), None)
    out_console.print(
        f"[bold]{result.model}[/] · statistics {result.stats} · held-out {result.data}"
        + (f" · {original.tokens_scored:,} tokens" if original and original.tokens_scored else "")
        + (f" · {result.reused} reused from {result.out}" if result.reused else ""),
        highlight=False,
    )
    out_console.print(sweep_table(result))
    for line in not_measured(result.rows):
        out_console.print(line, style="dim", highlight=False)
    found = verdicts(result.rows, result.defaults, result.floors)
    if found:
        out_console.print("[bold]direction[/] (lower perplexity wins):")
        for verdict in found:
            out_console.print(f"  {verdict.text()}", highlight=False)
    _recommend(result)
    if result.out is not None:
        out_console.print(f"results in {result.out}", style="dim", highlight=False)
    if plot is not None:
        out_console.print(f"plot written to {plot}", highlight=False)


def sweep_table(result: SweepResult) -> Table:
    """Per ratio, best first: measured rows with the random floor placed among them; failed rows last."""
    from moe_prune.stages.sweep import ranked

    task_columns = list(dict.fromkeys((t, v["metric"].split(",")[0]) for r in result.rows for t, v in r.tasks.items()))
    table = Table(title="sweep: held-out perplexity, best first within each ratio", title_justify="left")
    headers = ("ratio", "kept", "combination", "perplexity", "vs original", "vs random")
    for name in (*headers, *(f"{task}\n{metric}" for task, metric in task_columns), "note"):
        table.add_column(name, justify="left" if name in ("combination", "note") else "right")
    base = next((r.perplexity for r in result.rows if r.combo.kind == "original" and r.status == "done"), None)
    floors = result.floors
    by_ratio: dict[float, list[Row]] = {}
    for row in ranked(result.rows):
        if row.status in ("done", "failed") and row.combo.kind != "random":
            by_ratio.setdefault(row.combo.ratio, []).append(row)
    tasks = [task for task, _ in task_columns]
    for ratio in sorted(set(by_ratio) | set(floors)):
        if table.row_count:
            table.add_section()
        floor = floors.get(ratio)
        pending = floor is not None
        for row in by_ratio.get(ratio, []):
            if pending and floor is not None and row.quality > floor.value:
                table.add_row(*_floor_cells(floor, base, result.rows, tasks))
                pending = False
            table.add_row(*_cells(row, base, floor, tasks))
        if pending and floor is not None:
            table.add_row(*_floor_cells(floor, base, result.rows, tasks))
    return table


def _kept(kept: dict[int, int]) -> str:
    """'6' when every layer keeps 6 experts, else the mean and each layer's count."""
    values = list(kept.values())
    if len(set(values)) <= 1:
        return str(values[0]) if values else ""
    return f"{sum(values) / len(values):.3g} ({'/'.join(map(str, values))})"


def _versus(value: float | None, base: float | None) -> str:
    return "" if value is None or not base else f"{(value / base - 1) * 100:+.1f}%"


def _cells(row: Row, base: float | None, floor: Floor | None, tasks: list[str]) -> list[str]:
    ratio = f"{row.combo.ratio:g}" if row.combo.kind != "original" else "-"
    if row.status != "done" or row.perplexity is None:
        return [ratio, _kept(row.kept), row.combo.line, "-", "", "", *([""] * len(tasks)), f"failed: {row.reason}"]
    against = ""
    if floor is not None:
        times = row.perplexity / floor.value
        against = f"[{'red' if times > 1 else 'green'}]{times:.2f}x[/]"
    values = [f"{row.tasks[t]['value']:.3f}" if row.tasks.get(t, {}).get("value") is not None else "" for t in tasks]
    return [
        ratio,
        _kept(row.kept),
        row.combo.line,
        f"{row.perplexity:.3f}",
        _versus(row.perplexity, base),
        against,
        *values,
        "",
    ]


def _floor_cells(floor: Floor, base: float | None, rows: list[Row], tasks: list[str]) -> list[str]:
    """The random masks of one ratio as one row: the best perplexity (the floor), its spread, each task's best."""
    seeds = [r for r in rows if r.combo.kind == "random" and r.combo.ratio == floor.ratio and r.status == "done"]
    values = []
    for task in tasks:
        got = [r.tasks[task]["value"] for r in seeds if r.tasks.get(task, {}).get("value") is not None]
        values.append(f"{max(got):.3f}" if got else "")  # the best random mask on each task, like perplexity
    return [
        f"[dim]{floor.ratio:g}[/]",
        f"[dim]{_kept(seeds[0].kept) if seeds else ''}[/]",
        f"[dim italic]random: the floor, {floor.rule}[/]",
        f"[dim]{floor.value:.3f}[/]",
        f"[dim]{_versus(floor.value, base)}[/]",
        "[dim]1.00x[/]",
        *(f"[dim]{v}[/]" for v in values),
        f"[dim]median {floor.median:.3f}, mean {floor.mean:.3f}, range {floor.low:.3f} .. {floor.high:.3f}[/]",
    ]


def _recommend(result: SweepResult) -> None:
    """The best combination of each ratio with the commands that build it, then the one line to use."""
    floors = result.floors
    best = result.best()
    if not best:
        out_console.print("no pruned or merged model was measured: nothing to recommend", style="yellow")
        return
    out_console.print("[bold]best per ratio[/] (commands to build it without the sweep):")
    for ratio, row in best.items():
        floor = floors.get(ratio)
        against = f", {row.quality / floor.value:.2f}x the random floor ({floor.rule})" if floor else ""
        out_console.print(f"  {ratio:g}: {row.combo.line}, perplexity {row.quality:.3f}{against}", highlight=False)
        out_console.print(f"    {row.command}", markup=False, highlight=False, soft_wrap=True)
    chosen = result.recommended()
    if chosen is not None:
        at = ", ".join(f"{r:g}" for r in chosen["best_at"]) or "none"
        out_console.print(
            f"[bold]recommended:[/] {chosen['line']}: lowest geometric-mean perplexity over all ratios "
            f"({chosen['geometric_mean_perplexity']:.3f}); best at ratio(s) {at}",
            highlight=False,
        )
