"""Prune or merge to every combination of criteria, directions, scopes and ratios; rank them against random masks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from moe_prune.cli.common import (
    DEFAULT_MODEL,
    ForceOpt,
    JsonOpt,
    LazyBar,
    ModelArg,
    print_json,
    user_errors,
    warn,
)
from moe_prune.cli.spec_options import takes_spec
from moe_prune.cli.sweep_tables import report
from moe_prune.errors import MoePruneError
from moe_prune.specs.sweep import SweepSpec

if TYPE_CHECKING:
    from moe_prune.stages.sweep import Combo, SweepResult


@user_errors
@takes_spec(SweepSpec, "settings")
def sweep(
    stats: Annotated[Path, typer.Option("--stats", "-s", help="Statistics of this model (from `moe-prune profile`).")],
    model: ModelArg = DEFAULT_MODEL,
    *,
    settings: SweepSpec,  # one option per field (cli/spec_options.py)
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Work folder: results.jsonl and table.json; rerun to resume (default: a temporary one)."
        ),
    ] = None,
    plot: Annotated[
        bool, typer.Option("--plot", help="Also draw DIR/sweep.png: perplexity against experts kept, one line each.")
    ] = False,
    force: ForceOpt = False,
    json_output: JsonOpt = False,
) -> None:
    if plot:
        _check_plot(out)
    result = _run(model, stats, settings, out, force)
    for message in result.warnings:
        warn(message)
    drawn = None
    if plot and result.out is not None:
        from moe_prune.stages.sweep import PLOT_NAME, perplexity_plot

        drawn = result.out / PLOT_NAME
        perplexity_plot(result, drawn)
    if json_output:
        print_json({**result.to_dict(), "plot": str(drawn) if drawn else None})
        return
    report(result, drawn)


def _run(model: str, stats: Path, settings: SweepSpec, out: Path | None, force: bool) -> SweepResult:
    """The stage under one progress bar over the combinations."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from moe_prune.stages import sweep as stage

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with LazyBar(*columns) as bar:

        def advance(done: int, total: int, combo: Combo | None) -> None:
            label = f"sweep: {combo.line} @ {combo.ratio:g}" if combo is not None else "sweep: done"
            bar.update("sweep", label, completed=done, total=total)

        return stage.run(model, stats, settings, out, force, advance)


def _check_plot(out: Path | None) -> None:
    """The plot is one of the work folder's files (redrawn from every row on each run); matplotlib is there."""
    from moe_prune.stages.common import pyplot

    if out is None:
        raise MoePruneError("--plot draws DIR/sweep.png in the work folder; pass --out DIR")
    pyplot()
