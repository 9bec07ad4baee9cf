"""Merge experts (UNCURL, HC-SMoE, frequency baseline; weight or output space) or keep the most used."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from moe_prune.cli.common import (
    DEFAULT_MODEL,
    MAX_SEED,
    BufferMemoryOpt,
    DeviceOpt,
    DropMtpOpt,
    ForceOpt,
    JsonOpt,
    LazyBar,
    MaxShardSizeOpt,
    ModelArg,
    OutDirOpt,
    byte_progress,
    human_bytes,
    out_console,
    print_json,
    user_errors,
)
from moe_prune.errors import MoePruneError
from moe_prune.stages.common import check_not_input, check_plot, parse_size

if TYPE_CHECKING:
    from moe_prune.stages.merge import MergeResult


def parse_keep(values: list[str]) -> tuple[int, dict[int, int]]:
    """`--keep 4 --keep 0=6`: one default count and per-layer overrides `LAYER=COUNT`."""
    default: int | None = None
    overrides: dict[int, int] = {}
    for value in values:
        try:
            if "=" in value:
                layer, count = value.split("=", 1)
                overrides[int(layer)] = int(count)
            else:
                default = int(value)
        except ValueError as exc:
            raise MoePruneError(f"--keep {value!r}: expected a count (4) or LAYER=COUNT (0=6)") from exc
    if default is None:
        raise MoePruneError("--keep needs a count for every layer, e.g. --keep 4 (plus optional LAYER=COUNT)")
    if min([default, *overrides.values()]) < 1:
        raise MoePruneError("--keep counts must be at least 1")
    return default, overrides


def typed(ctx: typer.Context, param: str) -> bool:
    """Whether the user gave option `param` (its default is not the user's word: --device alone is refused)."""
    source = ctx.get_parameter_source(param)
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")


def parse_layers(values: list[str]) -> list[int]:
    try:
        return sorted({int(part) for value in values for part in value.split(",") if part.strip()})
    except ValueError as exc:
        raise MoePruneError(f"--skip-layers {values}: expected layer numbers such as 0 or 0,3") from exc


@user_errors
def merge(
    ctx: typer.Context,
    out: OutDirOpt,
    stats: Annotated[Path, typer.Option("--stats", "-s", help="Statistics of this model (from `moe-prune profile`).")],
    keep: Annotated[
        list[str], typer.Option("--keep", "-k", help="Experts per MoE layer after merging; LAYER=COUNT overrides.")
    ],
    model: ModelArg = DEFAULT_MODEL,
    method: Annotated[
        str, typer.Option(help="uncurl (router-logit clustering), hcsmoe (output clustering), frequency or prune.")
    ] = "uncurl",
    router: Annotated[
        str, typer.Option(help="Router rows of merged experts: anchor, average or reinit (then train the router).")
    ] = "anchor",
    weights: Annotated[
        str, typer.Option(help="Average members in proportion to: frequency (selections) or output (gate x norm).")
    ] = "frequency",
    refit: Annotated[
        bool,
        typer.Option(
            "--refit",
            help="Fit each slot's down projection to the layer's output: from profile --refit-stats sums, else in "
            "one layer-by-layer pass over the statistics' calibration windows.",
        ),
    ] = False,
    refit_ridge: Annotated[
        str | None,
        typer.Option(
            help="Relative ridge of --refit's least squares (default: a fixed one, shown in the refit table), or "
            "auto: chosen per slot on held-out calibration windows (layer-by-layer pass only)."
        ),
    ] = None,
    device: DeviceOpt = "cpu",
    buffer_memory: BufferMemoryOpt = None,
    skip_layers: Annotated[
        list[str] | None, typer.Option("--skip-layers", help="MoE layers to leave as they are (e.g. 0 or 0,5).")
    ] = None,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Seed of k-means and of --router reinit.")] = 0,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG heatmap of the similarity by cluster.")] = None,
    max_shard_size: MaxShardSizeOpt = "5GB",
    drop_mtp: DropMtpOpt = False,
    force: ForceOpt = False,
    json_output: JsonOpt = False,
) -> None:
    from moe_prune.stages import merge as stage
    from moe_prune.stages.merge import Stats

    default, overrides = parse_keep(keep)
    skip = parse_layers(skip_layers or [])
    check_not_input(out, (model, stats))
    check_plot(plot, force, (model, stats))
    loaded = Stats.load(stats)
    refit_bar = LazyBar(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn())

    def refit_update(done: int, total: int) -> None:
        refit_bar.update("refit", description="refit, layer by layer", completed=done, total=total)

    with refit_bar, byte_progress("writing shards") as write_update:

        def update(done: int, total: int) -> None:
            refit_bar.stop()  # the pass is over once writing starts
            write_update(done, total)

        result = stage.run(
            model,
            loaded,
            out,
            default,
            method=method,
            router=router,
            weights=weights,
            refit=refit,
            keep_overrides=overrides,
            skip_layers=skip,
            seed=seed,
            max_shard_size=max_shard_size,
            force=force,
            stats_name=str(stats),
            progress=update,
            drop_mtp=drop_mtp,
            refit_ridge=refit_ridge,
            device=device if typed(ctx, "device") else None,  # --device without the pass is refused, not ignored
            buffer_memory=parse_size(buffer_memory, "--buffer-memory") if buffer_memory else None,
            refit_progress=refit_update,
        )
    if plot is not None:
        from moe_prune.stages.merge import similarity_heatmaps

        similarity_heatmaps(result.layers, plot, force, (model, stats))
    if json_output:
        print_json(result.to_dict())
        return
    out_console.print(cluster_table(result))
    if result.refit_fits:
        out_console.print(refit_table(result))
    after = sorted(set(result.experts_after.values()))
    refit = ", down projections refit" if result.refit else ""
    out_console.print(
        f"experts per layer {result.experts_before} → {'/'.join(map(str, after))} ({result.method}, router "
        f"{result.router}, {result.weights}-weighted{refit}), top-k {result.top_k}, weights "
        f"{human_bytes(result.bytes_before)} → {human_bytes(result.bytes_after)} in {len(result.shards)} shard(s)"
    )
    for line in result.notes():
        out_console.print(line)
    if plot is not None:
        out_console.print(f"similarity heatmap: {plot}")


def cluster_table(result: MergeResult) -> Table:
    """One row per new expert slot: its members (original ids), anchor, frequencies, mean similarity."""
    table = Table(title=f"{result.method} → {result.out}")
    for name, justify in (("layer", "right"), ("slot", "right"), ("anchor", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    table.add_column("members (original id: selections, weight)")
    table.add_column("mean S", justify="right")
    for report in result.layers:
        if report.skipped:
            table.add_row(str(report.layer), "", "", f"skipped: all {report.experts_before} experts kept", "")
            continue
        for slot, cluster in enumerate(report.clusters):
            members = ", ".join(
                f"{m}: {f:.0f}, {w:.2f}"
                for m, f, w in zip(cluster.members, cluster.frequencies, cluster.weights, strict=True)
            )
            table.add_row(str(report.layer), str(slot), str(cluster.anchor), members, f"{cluster.similarity:.3f}")
    return table


def refit_table(result: MergeResult) -> Table:
    """One row per refit layer: the ridge chosen, the held-out error and the down projections' range."""
    table = Table(title="refit (layer by layer)")
    for name in ("layer", "ridge", "held-out error", "at 1e-6", "max |D| refit / original", "max ‖D‖ refit / original"):
        table.add_column(name, justify="right")
    for fit in result.refit_fits:
        ridges = "/".join(f"{r:g}" for r in sorted(set(fit.ridges)))
        error = "" if fit.held_out_error is None else f"{fit.held_out_error:.4f}"
        base = f"{fit.held_out_errors['1e-06']:.4f}" if fit.held_out_errors else ""
        table.add_row(
            str(fit.layer),
            ridges,
            error,
            base,
            f"{fit.max_abs:.3g} / {fit.original_max_abs:.3g}",
            f"{fit.max_norm:.3g} / {fit.original_max_norm:.3g}",
        )
    return table
