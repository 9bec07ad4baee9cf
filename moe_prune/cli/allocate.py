"""Search how many experts each MoE layer keeps (criterion's order inside a layer) and write the drop mask."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from moe_prune.cli.common import (
    DEFAULT_MODEL,
    DataOpt,
    ForceOpt,
    JsonOpt,
    LazyBar,
    ModelArg,
    out_console,
    print_json,
    user_errors,
    warn,
)
from moe_prune.cli.spec_options import takes_spec
from moe_prune.errors import MoePruneError
from moe_prune.specs.allocate import AllocateSpec
from moe_prune.stages.common import check_not_input, check_writable

if TYPE_CHECKING:
    from moe_prune.stages.allocate import AllocationReport


@user_errors
@takes_spec(AllocateSpec, "spec")
def allocate(
    model: ModelArg = DEFAULT_MODEL,
    stats: Annotated[str | None, typer.Option("--stats", help="Statistics .npz from `moe-prune profile`.")] = None,
    *,
    spec: AllocateSpec,  # one option per field (cli/spec_options.py)
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Mask JSON to write (--for merge: the counts and merge command).")
    ] = None,
    data: DataOpt = None,
    plot: Annotated[
        Path | None, typer.Option(help="PNG of the counts per layer: uniform, global and searched (matplotlib).")
    ] = None,
    force: ForceOpt = False,
    json_output: JsonOpt = False,
) -> None:
    from moe_prune.stages import allocate as stage

    inputs = _checked(spec, model, stats, out, data, plot, force)
    with LazyBar(*_columns()) as bar:
        mask, report = stage.allocate(
            stats,
            model,
            spec,
            data,
            lambda done, total: bar.update("candidates evaluated", completed=done, total=total),
        )
    _finish(mask, report, out, plot, force, inputs, json_output)


def _checked(
    s: AllocateSpec,
    model: str | None,
    stats: str | None,
    out: str | None,
    data: list[str] | None,
    plot: Path | None,
    force: bool,
) -> tuple[str, ...]:
    """The options checked before any work (the spec's by the stage, then the outputs'): the run's inputs."""
    from moe_prune.stages.allocate import choices
    from moe_prune.stages.common import check_plot

    choices(stats, s)
    inputs = tuple(p for p in (stats, model, *(data or ())) if p)
    if out is None:
        raise MoePruneError("pass --out MASK (the mask JSON to write)")
    check_writable(Path(out), force, "file")
    check_not_input(Path(out), inputs)
    check_plot(plot, force, (*inputs, out))
    return inputs


def _finish(
    mask: Any, report: Any, out: str, plot: Path | None, force: bool, inputs: tuple[str, ...], json_output: bool
) -> None:
    """Write the mask (or merge counts) and the plot, then print the tables or the JSON document."""
    from moe_prune.stages import allocate as stage
    from moe_prune.stages.score import write_mask

    if isinstance(mask, stage.MergeAllocation):
        mask.write(Path(out), force, inputs)
    else:
        write_mask(mask, Path(out), force, inputs=inputs)
    if plot is not None:
        from moe_prune.stages.allocate import counts_figure
        from moe_prune.stages.common import save_figure

        save_figure(counts_figure(report), plot, force, (*inputs, out))
    for message in report.warnings:
        warn(message)
    command = mask.command() if isinstance(mask, stage.MergeAllocation) else None
    if json_output:
        print_json({**report.to_dict(), "out": out, "plot": str(plot) if plot else None, "command": command})
        return
    out_console.print(allocation_table(report))
    if report.top_k is not None:
        out_console.print(top_k_table(report))
    if command is None:
        out_console.print(f"mask written to {out}", highlight=False)
        return
    out_console.print(f"counts for merge written to {out}; build it with:", highlight=False)
    out_console.print(f"  {command}", markup=False, highlight=False, soft_wrap=True)


def _columns() -> tuple:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    return TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()


def _per_layer_table(title: str, first: str, layers: list[int]) -> Table:
    """A table with one column per MoE layer between the row name and the objective's two values."""
    table = Table(title=title, title_justify="left", highlight=False)
    table.add_column(first)
    for layer in layers:
        table.add_column(str(layer), justify="right")
    table.add_column("ESAP", justify="right")
    table.add_column("KL", justify="right")
    return table


def allocation_table(report: AllocationReport) -> Table:
    """Counts per layer and the objective of each start and of the result."""
    table = _per_layer_table(
        f"{report.criterion}: experts kept per MoE layer ({report.objective} on {report.positions:,} "
        f"calibration positions, {report.evaluations} candidates, {report.seconds:.1f} s)",
        "allocation",
        report.layers,
    )
    for name, counts in report.counts.items():
        label = f"global ({report.global_from})" if name == "global" else name
        values = report.values[name]
        table.add_row(label, *map(str, counts), f"{values['esap']:.4f}", f"{values['kl']:.4f}")
    return table


def top_k_table(report: AllocationReport) -> Table:
    """Experts per token per layer: the model's, the greedy start's and the searched, with their objective."""
    top_k = report.top_k or {}
    table = _per_layer_table(
        f"top-k per MoE layer (--active-ratio {top_k['active_ratio']}: at most {top_k['budget']} per token "
        f"over the searched layers; {top_k['evaluations']} candidates)",
        "top-k",
        report.layers,
    )
    for name, key in (("model", "full"), ("greedy", "greedy"), ("searched", "searched")):
        values = top_k["values"][key]
        per_layer = top_k["top_k" if key == "searched" else key]
        table.add_row(name, *map(str, per_layer), f"{values['esap']:.4f}", f"{values['kl']:.4f}")
    return table
