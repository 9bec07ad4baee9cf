"""Collect routing, logit, activation (and with --gradients, gradient) statistics of a model on calibration data.

`moe-prune profile --combine a.npz b.npz --out c.npz` adds statistics of disjoint data exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from moe_prune.cli.common import (
    DataOpt,
    ForceOpt,
    JsonOpt,
    LazyBar,
    out_console,
    print_json,
    user_errors,
    warn,
)
from moe_prune.cli.spec_options import takes_spec
from moe_prune.errors import MoePruneError
from moe_prune.specs.profile import ProfileSpec
from moe_prune.stages.common import DEMO_CALIBRATION, DEMO_MODEL_DIR, check_not_input, check_writable
from moe_prune.stages.tasks import TASK_PREFIX

if TYPE_CHECKING:
    from moe_prune.stages.profile import ProfileResult, Settings


@user_errors
@takes_spec(ProfileSpec, "settings")
def profile(
    out: Annotated[Path, typer.Option("--out", "-o", help="Statistics file to write (.npz).")],
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            help="Model folder or hub id (default: the demo model); with --combine, the .npz files to add.",
            show_default=False,
        ),
    ] = None,
    data: DataOpt = None,
    task: Annotated[
        str | None,
        typer.Option(
            help="Calibrate on an lm-eval task's own documents (training/few-shot split, never the evaluated one)."
        ),
    ] = None,
    *,
    settings: ProfileSpec,  # one option per field (cli/spec_options.py)
    combine: Annotated[
        bool, typer.Option("--combine", help="Add the statistics files given as arguments (disjoint data).")
    ] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from OUT.partial.npz.")] = False,
    force: ForceOpt = False,
    json_output: JsonOpt = False,
) -> None:
    from moe_prune.stages.profile import parse_data
    from moe_prune.stages.profile_for import wanted

    if task is not None and data:
        raise MoePruneError("give --data or --task, not both")
    if settings.for_names:
        wanted(settings.for_names)  # an unknown name fails before anything is read
        if combine:
            raise MoePruneError("--for chooses what a profile run records; --combine adds files as they are")
    given = [f"{TASK_PREFIX}{task}"] if task is not None else data or [str(DEMO_CALIBRATION)]
    specs = parse_data(given)  # parsed once: the stage takes these, not the strings
    out = _check_out(out.expanduser(), force, (*(inputs or [str(DEMO_MODEL_DIR)]), *(s.source for s in specs)))
    if combine:
        _combine([Path(p) for p in inputs or []], out, force, json_output)
        return
    if inputs and len(inputs) > 1:
        raise MoePruneError(f"expected one model, got {len(inputs)} arguments (use --combine to add .npz files)")
    model = inputs[0] if inputs else str(DEMO_MODEL_DIR)
    result = _run(model, specs, settings, out, (force, resume))
    if result is not None:  # the main process reports
        _report(model, given, result, out, json_output)


def _run(
    model: str, specs: tuple[Any, ...], settings: ProfileSpec, out: Path, force_resume: tuple[bool, bool]
) -> ProfileResult | None:
    """Profile, resumable from OUT's partial with --save-every/--resume; the main process's result (others: None)."""
    from moe_prune.stages.profile import distributed, partial_path

    force, resume = force_resume
    place = distributed.world()
    partial = partial_path(out, place.rank) if (settings.save_every or resume) else None
    sources = tuple(spec.source for spec in specs)

    def save(result: ProfileResult) -> None:
        """Rank 0 writes the file, while every process still holds its partial (each then deletes its own)."""
        if place.is_main:
            result.stats.save(out, force, inputs=(model, *sources))

    try:
        result = _run_with_progress(model, specs, settings, partial, resume, place.is_main, save)
    finally:
        distributed.finish()
    return result if place.is_main else None


def _check_out(out: Path, force: bool, inputs: tuple[str, ...]) -> Path:
    """The output is a writable .npz path in an existing folder, none of the inputs: checked before any work."""
    check_writable(out, force, "file")
    check_not_input(out, inputs)
    if out.is_dir():
        raise MoePruneError(f"{out}: is a folder; expected a .npz file path")
    if not out.parent.is_dir():
        raise MoePruneError(f"{out.parent}: output folder does not exist")
    return out


def _report(model: str, given: list[str], result: ProfileResult, out: Path, json_output: bool) -> None:
    """The warnings, then JSON, or what was profiled, each source's part of a mix and the usage per layer."""
    for message in result.warnings:
        warn(message)
    if json_output:
        print_json({"out": str(out), **result.to_dict()})
        return
    out_console.print(
        f"[bold]{model}[/] on {' + '.join(given)}: {result.sequences} sequences × {result.seq_len} tokens "
        f"= {result.tokens:,} tokens → {out}",
        highlight=False,
    )
    if len(given) > 1:
        out_console.print(sources_table(result.stats.provenance["sources"]))
    out_console.print(usage_table(result))
    out_console.print("share = an expert's part of the layer's top-k selections; entropy 1.000 = even", style="dim")


def _run_with_progress(
    model: str,
    data: tuple[Any, ...],  # --data parsed once (`stages.profile.parse_data`)
    settings: Settings,
    partial: Path | None,
    resume: bool,
    show: bool,
    save: Callable[[ProfileResult], None],
) -> ProfileResult:
    from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeRemainingColumn

    from moe_prune.stages import profile as stage

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} tokens · {task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    bar = LazyBar(*columns)

    def advance(done: int, total: int) -> None:
        if show:
            speed = bar.speed("profiling")
            bar.update("profiling", completed=done, total=total, rate=f"{speed:,.0f} tok/s" if speed else "")

    try:
        return stage.run(model, data, settings, progress=advance, partial=partial, resume=resume, save=save)
    finally:
        bar.stop()


def _combine(paths: list[Path], out: Path, force: bool, json_output: bool) -> None:
    from moe_prune.stages import profile as stage

    merged = stage.combine(paths)
    merged.save(out, force, inputs=tuple(paths))
    tokens = int(merged.arrays["tokens"].max()) if merged.arrays["tokens"].size else 0
    if json_output:
        print_json({"out": str(out), "inputs": [str(p) for p in paths], "tokens": tokens})
        return
    out_console.print(f"combined {len(paths)} files ({tokens:,} tokens per MoE layer) → {out}", highlight=False)


def sources_table(sources: list[dict[str, Any]]) -> Table:
    """One row per data source of a mix: what it was asked for and what it gave."""
    table = Table(title="data sources", title_justify="left")
    for name in ("source", "format", "asked", "tokens", "share of tokens"):
        table.add_column(name, justify="left" if name in ("source", "format") else "right")
    for row in sources:
        asked = "the rest" if row["share"] is None else f"{row['share']:g}"
        if row["count"] is not None:
            asked = f"{row['count']:,} tokens"
        table.add_row(row["source"], row["format"], asked, f"{row['tokens']:,}", f"{row['share_of_tokens']:.3f}")
    return table


def usage_table(result: ProfileResult) -> Table:
    """One row per MoE layer: tokens and how evenly the experts were used."""
    table = Table(title="expert usage per MoE layer", title_justify="left")
    for name in ("layer", "tokens", "min share", "max share", "max/mean", "entropy"):
        table.add_column(name, justify="right")
    for row in result.layers:
        table.add_row(
            str(row.layer),
            f"{row.tokens:,}",
            f"{row.min_share:.3f}",
            f"{row.max_share:.3f}",
            f"{row.max_over_mean:.2f}",
            f"{row.entropy:.3f}",
        )
    return table
