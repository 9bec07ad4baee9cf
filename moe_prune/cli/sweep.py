"""Prune or merge to every combination of criteria, directions, scopes and ratios; rank them against random masks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from moe_prune.cli.common import (
    DEFAULT_DATA,
    DEFAULT_MODEL,
    MAX_SEED,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    LazyBar,
    ModelArg,
    SplitOnOpt,
    TrustOpt,
    parse_device_map,
    print_json,
    user_errors,
    warn,
)
from moe_prune.cli.sweep_tables import report
from moe_prune.errors import MoePruneError

if TYPE_CHECKING:
    from moe_prune.stages.sweep import Combo, SweepResult, SweepSettings
    from moe_prune.stages.tasks import TaskSettings


@user_errors
def sweep(
    stats: Annotated[Path, typer.Option("--stats", "-s", help="Statistics of this model (from `moe-prune profile`).")],
    model: ModelArg = DEFAULT_MODEL,
    criteria: Annotated[
        str, typer.Option("--criteria", "-c", help="Comma-separated criteria, or all (see `moe-prune score --list`).")
    ] = "all",
    ratios: Annotated[
        str, typer.Option(help="Comma-separated fractions of experts to drop, each in (0, 1).")
    ] = "0.25,0.5",
    directions: Annotated[
        str, typer.Option(help="default (the papers'), opposite, or both (the sweep says which one holds).")
    ] = "default",
    global_: Annotated[
        str,
        typer.Option(
            "--global",
            help="Scopes, comma-separated: layer (each layer drops the ratio), global (where comparable), search "
            "(per-layer counts searched by `allocate`); both = layer,global; all = the three.",
        ),
    ] = "layer",
    merge_methods: Annotated[
        str | None, typer.Option(help="Comma-separated merge methods (see `moe-prune merge --help`), or all.")
    ] = None,
    merge_weights: Annotated[
        str, typer.Option(help="Merges average members by: frequency, output, or both comma-separated.")
    ] = "frequency",
    merge_refit: Annotated[
        str, typer.Option(help="Merges with refit down projections: no, yes or both (needs refit sums or a pass).")
    ] = "no",
    search_evals: Annotated[
        int, typer.Option(help="With --global search: candidates each allocation search evaluates.")
    ] = 32,
    random_seeds: Annotated[
        int, typer.Option(help="Random masks per ratio; the best of them (lowest perplexity) is the floor.")
    ] = 5,
    prune_hopeless: Annotated[
        bool,
        typer.Option(
            "--prune-hopeless", help="Stop a line at larger ratios once it is worse than random at a smaller one."
        ),
    ] = False,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Seed of the merge methods (k-means).")] = 0,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Work folder: results.jsonl and table.json; rerun to resume (default: a temporary one)."
        ),
    ] = None,
    plot: Annotated[
        bool, typer.Option("--plot", help="Also draw DIR/sweep.png: perplexity against experts kept, one line each.")
    ] = False,
    data: Annotated[
        str, typer.Option("--data", "-d", help="Held-out text to evaluate on (file or hub dataset).")
    ] = DEFAULT_DATA,
    text_field: Annotated[str, typer.Option(help="Field/column holding the text in structured data.")] = "text",
    split_on: SplitOnOpt = "none",
    seq_len: Annotated[int, typer.Option(help="Tokens per evaluated sequence.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 8,
    max_tokens: Annotated[int | None, typer.Option(help="Evaluate at most this many tokens of the data.")] = None,
    tasks: Annotated[
        str | None,
        typer.Option("--tasks", help="Also score these lm-eval tasks (e.g. demo); needs moe-prune\\[tasks]."),
    ] = None,
    num_fewshot: Annotated[int | None, typer.Option(help="With --tasks: few-shot demonstrations.")] = None,
    limit: Annotated[int | None, typer.Option(help="With --tasks: at most this many documents per task.")] = None,
    include_path: Annotated[
        Path | None,
        typer.Option(help="With --tasks: folder of your own task YAMLs; their code needs --trust-remote-code."),
    ] = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    device_map: DeviceMapOpt = None,
    trust_remote_code: TrustOpt = False,
    force: ForceOpt = False,
    json_output: JsonOpt = False,
) -> None:
    from moe_prune.stages import sweep as stage
    from moe_prune.stages.sweep import parse_names, parse_ratios

    if plot:
        _check_plot(out)
    device = parse_device_map(device_map, device)
    settings = stage.SweepSettings(
        criteria=() if criteria.strip() == "all" else tuple(parse_names(criteria, "--criteria")),
        ratios=parse_ratios(ratios),
        directions=directions,
        scopes=global_,
        merge_methods=_methods(merge_methods),
        merge_weights=tuple(parse_names(merge_weights, "--merge-weights")),
        merge_refit=merge_refit,
        search_evals=search_evals,
        random_seeds=random_seeds,
        prune_hopeless=prune_hopeless,
        data=data,
        text_field=text_field,
        split_on=split_on,
        seq_len=seq_len,
        batch_size=batch_size,
        max_tokens=max_tokens,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        merge_seed=seed,
        tasks=_task_settings(tasks, num_fewshot, limit, include_path, batch_size, dtype, device, trust_remote_code),
    )
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


def _task_settings(
    spec: str | None,
    num_fewshot: int | None,
    limit: int | None,
    include_path: Path | None,
    batch_size: int,
    dtype: str,
    device: str,
    trust_remote_code: bool,
) -> TaskSettings | None:
    """--tasks and its options (the model is loaded like for perplexity); the options alone are refused."""
    from moe_prune.stages.tasks import TaskSettings, parse_tasks

    if spec is None:
        if any(v is not None for v in (num_fewshot, limit, include_path)):
            raise MoePruneError("--num-fewshot, --limit and --include-path apply to --tasks only")
        return None
    names = parse_tasks(spec)
    return TaskSettings(names, num_fewshot, limit, include_path, batch_size, dtype, device, trust_remote_code)


def _run(model: str, stats: Path, settings: SweepSettings, out: Path | None, force: bool) -> SweepResult:
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


def _methods(spec: str | None) -> tuple[str, ...]:
    from moe_prune.stages.sweep import METHODS, parse_names

    if spec is None:
        return ()
    return tuple(METHODS.names()) if spec.strip() == "all" else tuple(parse_names(spec, "--merge-methods"))
