"""MoE lottery subnetworks: k rounds of profile -> score -> prune -> finetune; resumable, reproducible by recipe."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from moe_prune.cli.common import (
    JsonOpt,
    LazyBar,
    out_console,
    print_json,
    user_errors,
    warn,
)
from moe_prune.cli.spec_options import takes_spec
from moe_prune.errors import MoePruneError
from moe_prune.specs.lottery import LotteryParams
from moe_prune.stages.common import check_plot

if TYPE_CHECKING:
    from moe_prune.stages.lottery import LotteryResult


@user_errors
@takes_spec(LotteryParams, "given", unset=True)
def lottery(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (round-NN/ per round, recipe.json, report).")],
    *,
    given: dict[str, Any],  # one option per LotteryParams field, the ones passed (cli/spec_options.py)
    recipe: Annotated[
        str | None, typer.Option("--recipe", help="Run the experiment of a recipe.json again (no other parameters).")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="PNG of the dropped experts (figure 5 with --compare).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing run folder.")] = False,
    json_output: JsonOpt = False,
) -> None:
    from moe_prune.stages import lottery as stage
    from moe_prune.stages.common import DEMO_CALIBRATION, DEMO_MODEL_DIR
    from moe_prune.stages.lottery import Recipe

    expected = None
    if recipe is not None:
        if given:
            names = ", ".join(sorted(given))
            raise MoePruneError(f"--recipe sets every parameter; do not also pass {names}")
        expected = Recipe.read(recipe)
        params = expected.params
    else:
        if "criterion" not in given:
            raise MoePruneError("pass --criterion NAME (see `moe-prune score --list`) or --recipe FILE")
        defaults = {"model": str(DEMO_MODEL_DIR), "data": str(DEMO_CALIBRATION)}
        params = LotteryParams(**(defaults | given))
    check_plot(plot, force, (params.model,))
    with _RoundBar() as bar:
        result = stage.run(params, out, force=force, progress=bar.round, expected=expected)
    if plot is not None:
        from moe_prune.stages.lottery import agreement_plot as draw

        draw({name: m.dropped for name, m in result.methods.items()}, result.experts, plot, force, (params.model,))
    for message in result.warnings:
        warn(message)
    if json_output:
        print_json({**result.to_dict(), "plot": str(plot) if plot else None})
        return
    _print(result)
    if plot is not None:
        out_console.print(f"plot written to {plot}", highlight=False)


class _RoundBar(LazyBar):
    """Rounds done over all methods, the current step in the description."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

        super().__init__(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.seen: list[tuple[str, int]] = []

    def round(self, method: str, round_: int, total: int, step: str) -> None:
        if (method, round_) not in self.seen:
            self.seen.append((method, round_))
        self.update("rounds", f"{method} round {round_}/{total}: {step}", completed=len(self.seen) - 1)


def _ppl(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}" if math.isfinite(value) else "inf"


def _print(result: LotteryResult) -> None:
    schedule = result.recipe["schedule"]
    params = result.recipe["params"]
    out_console.print(
        f"{params['criterion']} → {result.out}: {sum(schedule['drops_per_round'])} of "
        f"{len(next(iter(result.experts.values())))} experts per layer dropped in "
        f"{len(schedule['drops_per_round'])} round(s) {schedule['drops_per_round']}"
        + (", resumed" if result.resumed else ""),
        highlight=False,
    )
    rounds = Table(title="perplexity after each round (held-out)", title_justify="left")
    for name in ("method", "round", "dropped per layer (original ids, layer:ids)", "tokens trained", "perplexity"):
        rounds.add_column(name, justify="left" if name.startswith(("method", "dropped")) else "right")
    rounds.add_row("original", "0", "-", "-", _ppl(result.baseline_perplexity))
    for method in result.methods.values():
        for r in method.rounds:
            dropped = "  ".join(f"{layer}:{','.join(map(str, ids))}" for layer, ids in r.dropped.items())
            reused = " (kept)" if r.reused else ""
            rounds.add_row(method.name, f"{r.round}{reused}", dropped, f"{r.trained or 0:,}", _ppl(r.perplexity))
    out_console.print(rounds)
    if len(result.methods) > 1:
        out_console.print(_comparison(result))
        out_console.print(_agreement(result))


def _comparison(result: LotteryResult) -> Table:
    title = f"{' vs '.join(result.methods)} (final perplexity, held-out)"
    table = Table(title=title, title_justify="left")
    for name in ("method", "rounds", "tokens trained", "perplexity"):
        table.add_column(name, justify="left" if name == "method" else "right")
    table.add_row("original", "-", "-", _ppl(result.baseline_perplexity))
    for method in result.methods.values():
        table.add_row(method.name, str(len(method.rounds)), f"{method.trained:,}", _ppl(method.rounds[-1].perplexity))
    return table


def _agreement(result: LotteryResult) -> Table:
    """Per layer: each method's dropped original experts, then each pair's both-drop / disagree / Jaccard."""
    from moe_prune.stages.lottery import PAIRS

    pairs = [(x, y) for x, y in PAIRS if x in result.methods and y in result.methods]
    table = Table(title="dropped experts (original ids); agreement: both drop/disagree/Jaccard", title_justify="left")
    table.add_column("layer", justify="right")
    for name in result.methods:
        table.add_column(name)
    for x, y in pairs:
        table.add_column(f"{x} vs {y}", justify="right")
    by_key = {(row.first, row.second, row.layer): row for row in result.agreement}
    dropped = {name: m.dropped for name, m in result.methods.items()}
    for layer in result.experts:
        cells = [" ".join(map(str, dropped[name][layer])) for name in result.methods]
        for x, y in pairs:
            row = by_key[(x, y, layer)]
            cells.append(f"{row.both_drop}/{row.disagree}/{row.jaccard:.2f}")
        table.add_row(str(layer), *cells)
    return table
