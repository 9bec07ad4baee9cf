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
    from moe_prune.stages.allocate import AllocationReport, MergeTarget


SEQUENTIAL_REFUSAL = (
    "allocate --sequential is not supported: each candidate is a whole forward pass, so one layer at a time would "
    "read the checkpoint from disk once per candidate; use --device auto (GPUs) or score --global"
)


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

    s = spec
    target, active, budget, inputs = _checked(s, model, stats, out, data, plot, force)
    calibration = stage.Calibration(
        data, s.samples, s.seq_len, s.batch_size, s.top_logprobs, s.dtype, s.device, s.trust_remote_code
    )
    with LazyBar(*_columns()) as bar:
        mask, report = stage.allocate(
            stats,
            model,
            s.criterion,
            budget,
            objective=s.objective,
            calibration=calibration,
            budget_evals=s.budget_evals,
            seed=s.seed,
            min_per_layer=s.min_per_layer,
            skip_layers=s.skip_layers or (),
            progress=lambda done, total: bar.update("candidates evaluated", completed=done, total=total),
            merge=target,
            active_ratio=active,
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
) -> tuple[MergeTarget | None, float | None, Any, tuple[str, ...]]:
    """The options checked before any work: (merge target, active ratio, budget, the run's inputs)."""
    from moe_prune.stages.allocate import Budget
    from moe_prune.stages.common import check_plot, parse_size

    if s.sequential:
        raise MoePruneError(SEQUENTIAL_REFUSAL)
    if stats is None:
        raise MoePruneError("pass --stats STATS (produce it with `moe-prune profile`)")
    target = _target(s.for_, s.method, s.weights, s.refit, s.merge_seed)
    active = _active_ratio(s.top_k, s.active_ratio)
    if s.criterion is None and target is None:
        raise MoePruneError("pass --criterion NAME (see `moe-prune score --list`)")
    if [s.ratio, s.keep, s.bytes_].count(None) != 2:
        raise MoePruneError("give exactly one of --ratio R, --keep N or --bytes SIZE")
    budget = parse_size(s.bytes_, "--bytes") if s.bytes_ is not None else Budget(keep=s.keep, ratio=s.ratio)
    inputs = tuple(p for p in (stats, model, *(data or ())) if p)
    if out is None:
        raise MoePruneError("pass --out MASK (the mask JSON to write)")
    check_writable(Path(out), force, "file")
    check_not_input(Path(out), inputs)
    check_plot(plot, force, (*inputs, out))
    return target, active, budget, inputs


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


def _target(for_: str, method: str | None, weights: str | None, refit: bool, seed: int | None) -> MergeTarget | None:
    """--for merge and its options; the options without it are refused."""
    from moe_prune.stages.allocate import MergeTarget

    if for_ not in ("prune", "merge"):
        raise MoePruneError(f"--for {for_!r}: use prune or merge")
    if for_ == "prune":
        given = [name for name, v in (("--method", method), ("--weights", weights), ("--merge-seed", seed)) if v]
        if given or refit:
            raise MoePruneError(f"{', '.join(given + ['--refit'] * refit)} apply to --for merge only")
        return None
    return MergeTarget(method or "uncurl", weights or "frequency", refit, seed or 0)


def _active_ratio(top_k: str, ratio: float | None) -> float | None:
    """--top-k search needs --active-ratio; --top-k keep refuses it."""
    if top_k not in ("keep", "search"):
        raise MoePruneError(f"--top-k {top_k!r}: use keep or search")
    if top_k == "keep":
        if ratio is not None:
            raise MoePruneError("--active-ratio applies to --top-k search only")
        return None
    if ratio is None:
        raise MoePruneError("--top-k search needs --active-ratio R (the share of experts per token kept)")
    return ratio


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
