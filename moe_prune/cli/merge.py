"""Merge experts (UNCURL, HC-SMoE, frequency baseline; weight or output space) or keep the most used."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from moe_prune.cli.common import (
    DEFAULT_MODEL,
    JsonOpt,
    LazyBar,
    ModelArg,
    OutDirOpt,
    byte_progress,
    human_bytes,
    out_console,
    print_json,
    user_errors,
)
from moe_prune.cli.spec_options import takes_spec
from moe_prune.errors import MoePruneError
from moe_prune.specs.merge import MergeSpec
from moe_prune.stages.common import check_not_input, check_plot

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


@user_errors
@takes_spec(MergeSpec, "spec")
def merge(
    out: OutDirOpt,
    stats: Annotated[Path, typer.Option("--stats", "-s", help="Statistics of this model (from `moe-prune profile`).")],
    keep: Annotated[
        list[str], typer.Option("--keep", "-k", help="Experts per MoE layer after merging; LAYER=COUNT overrides.")
    ],
    model: ModelArg = DEFAULT_MODEL,
    *,
    spec: MergeSpec,  # one option per field (cli/spec_options.py), passed whole to stages.merge.run
    plot: Annotated[Path | None, typer.Option(help="Write a PNG heatmap of the similarity by cluster.")] = None,
    json_output: JsonOpt = False,
) -> None:
    from moe_prune.stages import merge as stage
    from moe_prune.stages.merge import Stats

    default, overrides = parse_keep(keep)
    force = spec.force
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
            model, loaded, out, default, spec, keep_overrides=overrides, stats_name=str(stats), progress=update,
            refit_progress=refit_update,
        )  # fmt: skip
    if plot is not None:
        from moe_prune.stages.merge import similarity_heatmaps

        similarity_heatmaps(result.layers, plot, force, (model, stats))
    if json_output:
        print_json(result.to_dict())
        return
    _print(result, plot)


def _print(result: MergeResult, plot: Path | None) -> None:
    """The clusters, the refit fits, the sizes before and after, and the checkpoint's notes."""
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
