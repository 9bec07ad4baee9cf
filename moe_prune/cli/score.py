"""Score every routed expert with a criterion (statistics and/or weights) and write the drop mask."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from moe_prune.cli.common import (
    ForceOpt,
    JsonOpt,
    LazyBar,
    err_console,
    out_console,
    print_json,
    user_errors,
    warn,
)
from moe_prune.cli.spec_options import takes_spec
from moe_prune.errors import MoePruneError
from moe_prune.specs.score import ScoreSpec
from moe_prune.stages.common import check_not_input, check_writable

if TYPE_CHECKING:
    from moe_prune.stages.score import LayerStability, ScoreReport

COMPACT_EXPERTS = 16  # wider layers list only the dropped experts' scores and the range
MARGIN = {
    "expert": "(first kept - last dropped score) / the layer's score spread",
    "pair": "(last pair taken - the pair the rule would take next) / the layer's spread of pair values",
}


@user_errors
@takes_spec(ScoreSpec, "spec")
def score(
    stats: Annotated[
        str | None, typer.Argument(help="Statistics .npz from `moe-prune profile` (omit for weight criteria).")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Checkpoint folder or hub id (weight criteria; checks top-k).")
    ] = None,
    *,
    spec: ScoreSpec,  # one option per field (cli/spec_options.py)
    out: Annotated[
        str | None,
        typer.Option("--out", "-o", help="Mask JSON to write; - writes it to stdout (pipe into `prune --mask -`)."),
    ] = None,
    force: ForceOpt = False,
    report: Annotated[bool, typer.Option("--report", help="Print every expert's score and what is dropped.")] = False,
    list_: Annotated[bool, typer.Option("--list", help="List the criteria and exit.")] = False,
    explain: Annotated[
        bool,
        typer.Option(
            "--explain",
            help="With --model: how its architecture is read (table row or derived from transformers), "
            "what the derivation assumed, and exit.",
        ),
    ] = False,
    json_output: JsonOpt = False,
) -> None:
    from moe_prune.stages import score as stage

    if list_ or explain:  # modes that print and exit
        _list(json_output) if list_ else _explain(model, json_output)
        return
    if spec.criterion is None:
        raise MoePruneError("pass --criterion NAME (see `moe-prune score --list`)")
    inputs = tuple(p for p in (stats, model, *spec.stability) if p)
    _check_out(out, force, inputs, json_output, spec)
    console = err_console if out == "-" else out_console
    with _progress() as (progress, draw_progress):
        mask, result = stage.score_spec(stats, model, spec, progress=progress, draw_progress=draw_progress)
    if out == "-":
        typer.echo(mask.dumps(), nl=False)
    elif out is not None:
        stage.write_mask(mask, Path(out), force, inputs=inputs)
    for message in result.warnings:  # after the write, so a refused output is the one line printed
        warn(message)
    if json_output:
        print_json({**result.to_dict(), "out": out})
        return
    console.print(score_table(result, full=report or out is None))
    if out not in (None, "-"):
        console.print(f"mask written to {out}", highlight=False)


def _check_out(out: str | None, force: bool, inputs: tuple[str, ...], json_output: bool, spec: ScoreSpec) -> None:
    """The one output check, before any scoring: stdout not shared with --json, a writable file (not a device
    node, a folder or an input), and a budget to write a mask for."""
    if out == "-" and json_output:
        raise MoePruneError("--out - writes the mask to stdout; --json cannot share it")
    if out not in (None, "-"):
        check_writable(Path(out), force, "file")
        check_not_input(Path(out), inputs)
    if not spec.budget_given and out is not None:
        raise MoePruneError("give exactly one of --drop N, --keep N or --ratio R")


def _explain(model: str | None, json_output: bool) -> None:
    from moe_prune.stages.explain import explain

    if model is None:
        raise MoePruneError("--explain needs --model M (the checkpoint whose architecture to explain)")
    found = explain(model)
    if json_output:
        print_json(found.to_dict())
        return
    how = "read by a hand-written table row" if found.source == "table" else "derived from transformers' own modules"
    lines = [f"{found.model}: model_type {found.model_type}, {how}"]
    lines += [f"  {key}: {value}" for key, value in found.adapter.items()]
    lines += [f"note: {note}" for note in found.notes or ("none",)]
    for line in lines:
        out_console.print(line, highlight=False, markup=False, soft_wrap=True)


def _list(json_output: bool) -> None:
    from moe_prune.stages.score import all_criteria

    criteria = sorted(all_criteria(), key=lambda c: c.name)
    if json_output:
        print_json(
            [
                {
                    "name": c.name,
                    "direction": c.direction,
                    "kind": c.kind,
                    "needs": c.needs(),
                    "global": c.global_ok,
                    "description": c.description,
                    "source": c.source,
                }
                for c in criteria
            ]
        )
        return
    table = Table(title="criteria (--direction defaults to the one shown)", title_justify="left")
    for name in ("criterion", "dir", "needs", "global"):
        table.add_column(name, no_wrap=name != "needs")
    table.add_column("what it scores")
    for c in criteria:
        table.add_row(c.name, c.direction, c.needs(), "yes" if c.global_ok else "", c.description)
    out_console.print(table)


def score_table(result: ScoreReport, full: bool) -> Table:
    """Per layer: what is dropped, how stable that is, and (full) every expert's score, dropped ones in red."""
    what = "usage (hard counts)" if result.kind == "pair" else "score"
    stable = result.stability
    table = Table(
        title=f"{result.criterion} ({result.direction}): {result.source}",
        title_justify="left",
        highlight=False,
        caption=f"margin: {MARGIN[result.kind]}; {stable.note}" if stable else None,
        caption_justify="left",
    )
    table.add_column("layer", justify="right")
    table.add_column("dropped (original ids, in order)")
    table.add_column("kept", justify="right")
    if stable:
        table.add_column("margin", justify="right")
    if stable and stable.parts:
        table.add_column("agreement (jaccard)", justify="right")
    if full:
        table.add_column(f"{what} per expert (original id: value)")
    for layer, ids in result.original_ids.items():
        dropped = result.dropped[layer]
        row = [str(layer), " ".join(map(str, dropped)) or "-", str(len(ids) - len(dropped))]
        if stable:
            row.append(_margin(stable.layers[layer]))
        if stable and stable.parts:
            row.append(_agreement(stable.layers[layer]))
        if full:
            row.append(_scores(ids, result.scores[layer], set(dropped), result.pairs.get(layer)))
        table.add_row(*row)
    return table


def _margin(layer: LayerStability) -> str:
    if layer.constant:
        return "[yellow]constant[/]"
    if layer.tie:
        return "[yellow]tie[/]"
    return "-" if layer.margin is None else f"{layer.margin:.3f}"


def _agreement(layer: LayerStability) -> str:
    if layer.agreement is None or layer.jaccard is None:
        return "-"
    text = f"{layer.agreement:.0%} ({layer.jaccard:.2f})"
    return f"[yellow]{text}[/]" if layer.unstable else text


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _scores(ids: tuple[int, ...], scores: list[float], dropped: set[int], pairs: Any) -> str:
    if len(ids) > COMPACT_EXPERTS:
        ordered = sorted(scores)
        shown = " ".join(f"[red]{i}:{_fmt(s)}[/]" for i, s in zip(ids, scores, strict=True) if i in dropped)
        text = f"{shown} · range {_fmt(ordered[0])} .. {_fmt(ordered[-1])}"
    else:
        text = " ".join(
            f"[red]{i}:{_fmt(s)}[/]" if i in dropped else f"{i}:{_fmt(s)}" for i, s in zip(ids, scores, strict=True)
        )
    if pairs:
        text += "\npairs: " + ", ".join(f"({p},{q})={_fmt(v)}" for p, q, v in pairs)
    return text


@contextmanager
def _progress() -> Iterator[tuple[Callable[[int, int], None], Callable[[int, int], None]]]:
    """Bars of MoE layers read (weight criteria) and bootstrap draws, started on the first update so quick
    runs print nothing."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

    with LazyBar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()) as bar:
        yield (
            lambda done, total: bar.update("reading expert weights", completed=done, total=total),
            lambda done, total: bar.update("bootstrap draws", completed=done, total=total),
        )
