"""Search how many experts each MoE layer keeps (criterion's order inside a layer) and write the drop mask."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from moe_prune.cli.common import (
    DEFAULT_MODEL,
    MAX_SEED,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    LazyBar,
    ModelArg,
    TrustOpt,
    out_console,
    print_json,
    user_errors,
    warn,
)
from moe_prune.errors import MoePruneError
from moe_prune.stages.common import check_not_input, check_writable

if TYPE_CHECKING:
    from moe_prune.stages.allocate import AllocationReport, MergeTarget


SEQUENTIAL_REFUSAL = (
    "allocate --sequential is not supported: each candidate is a whole forward pass, so one layer at a time would "
    "read the checkpoint from disk once per candidate; use --device auto (GPUs) or score --global"
)


@user_errors
def allocate(
    model: ModelArg = DEFAULT_MODEL,
    stats: Annotated[str | None, typer.Option("--stats", help="Statistics .npz from `moe-prune profile`.")] = None,
    criterion: Annotated[
        str | None,
        typer.Option(
            "--criterion",
            "-c",
            help=(
                "Criterion ordering experts inside a layer (--for merge: ranks the global start; default "
                "soft-counts, or usage-frequency without soft_counts)."
            ),
        ),
    ] = None,
    ratio: Annotated[float | None, typer.Option(help="Fraction of the searched layers' experts to drop.")] = None,
    keep: Annotated[int | None, typer.Option(help="Experts to keep in the searched layers together.")] = None,
    bytes_: Annotated[
        str | None, typer.Option("--bytes", help="Largest checkpoint size, e.g. 10MB, 5GiB (routed experts + rest).")
    ] = None,
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Mask JSON to write (--for merge: the counts and merge command).")
    ] = None,
    for_: Annotated[
        str, typer.Option("--for", help="prune (a drop mask) or merge (counts for `merge`, judged as merged).")
    ] = "prune",
    method: Annotated[
        str | None, typer.Option(help="With --for merge: the merge method (see `moe-prune merge --help`).")
    ] = None,
    weights: Annotated[
        str | None, typer.Option(help="With --for merge: average members by frequency or output.")
    ] = None,
    refit: Annotated[
        bool, typer.Option("--refit", help="With --for merge: refit down projections (profile --refit-stats).")
    ] = False,
    merge_seed: Annotated[
        int | None, typer.Option(min=0, max=MAX_SEED, help="With --for merge: the merge method's seed (k-means).")
    ] = None,
    objective: Annotated[
        str, typer.Option(help="esap (Σ min(p, q)) or kl (KL(p‖q)) against the original, on calibration tokens.")
    ] = "kl",
    top_k: Annotated[
        str,
        typer.Option(
            "--top-k",
            help="keep (the model's top-k) or search (per-layer top-k after the counts, LExI-style; see README).",
        ),
    ] = "keep",
    active_ratio: Annotated[
        float | None,
        typer.Option(help="With --top-k search: share of the searched layers' experts per token kept, in (0, 1)."),
    ] = None,
    data: DataOpt = None,
    samples: Annotated[int, typer.Option(help="Calibration windows the candidates are judged on.")] = 16,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per window (default: the statistics').")] = None,
    top_logprobs: Annotated[
        int, typer.Option(help="The original's most likely tokens stored per position (all when >= vocabulary).")
    ] = 2048,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    budget_evals: Annotated[int, typer.Option(help="Candidates evaluated at most (starts included).")] = 64,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Seed of the search's move order.")] = 0,
    min_per_layer: Annotated[
        int | None, typer.Option(help="Fewest experts a searched layer keeps (default and minimum: top-k).")
    ] = None,
    skip_layers: Annotated[
        str | None, typer.Option(help="Comma-separated MoE layers kept whole and left out of the budget.")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="PNG of the counts per layer: uniform, global and searched (matplotlib).")
    ] = None,
    sequential: Annotated[
        bool, typer.Option("--sequential", help="Refused: every candidate is a whole forward pass (see README).")
    ] = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    trust_remote_code: TrustOpt = False,
    force: ForceOpt = False,
    json_output: JsonOpt = False,
) -> None:
    from moe_prune.stages import allocate as stage
    from moe_prune.stages.allocate import Budget
    from moe_prune.stages.common import check_plot, parse_size
    from moe_prune.stages.score import write_mask

    if sequential:
        raise MoePruneError(SEQUENTIAL_REFUSAL)
    if stats is None:
        raise MoePruneError("pass --stats STATS (produce it with `moe-prune profile`)")
    target = _target(for_, method, weights, refit, merge_seed)
    active = _active_ratio(top_k, active_ratio)
    if criterion is None and target is None:
        raise MoePruneError("pass --criterion NAME (see `moe-prune score --list`)")
    if [ratio, keep, bytes_].count(None) != 2:
        raise MoePruneError("give exactly one of --ratio R, --keep N or --bytes SIZE")
    budget = parse_size(bytes_, "--bytes") if bytes_ is not None else Budget(keep=keep, ratio=ratio)
    inputs = tuple(p for p in (stats, model, *(data or ())) if p)
    if out is None:
        raise MoePruneError("pass --out MASK (the mask JSON to write)")
    check_writable(Path(out), force, "file")
    check_not_input(Path(out), inputs)
    check_plot(plot, force, (*inputs, out))
    calibration = stage.Calibration(data, samples, seq_len, batch_size, top_logprobs, dtype, device, trust_remote_code)
    with LazyBar(*_columns()) as bar:
        mask, report = stage.allocate(
            stats,
            model,
            criterion,
            budget,
            objective=objective,
            calibration=calibration,
            budget_evals=budget_evals,
            seed=seed,
            min_per_layer=min_per_layer,
            skip_layers=_layers(skip_layers),
            progress=lambda done, total: bar.update("candidates evaluated", completed=done, total=total),
            merge=target,
            active_ratio=active,
        )
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


def _layers(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError as exc:
        raise MoePruneError(f"--skip-layers {text!r}: expected comma-separated layer numbers") from exc


def _columns() -> tuple:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    return TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()


def allocation_table(report: AllocationReport) -> Table:
    """Counts per layer and the objective of each start and of the result."""
    table = Table(
        title=f"{report.criterion}: experts kept per MoE layer ({report.objective} on {report.positions:,} "
        f"calibration positions, {report.evaluations} candidates, {report.seconds:.1f} s)",
        title_justify="left",
        highlight=False,
    )
    table.add_column("allocation")
    for layer in report.layers:
        table.add_column(str(layer), justify="right")
    table.add_column("ESAP", justify="right")
    table.add_column("KL", justify="right")
    for name, counts in report.counts.items():
        label = f"global ({report.global_from})" if name == "global" else name
        values = report.values[name]
        table.add_row(label, *map(str, counts), f"{values['esap']:.4f}", f"{values['kl']:.4f}")
    return table


def top_k_table(report: AllocationReport) -> Table:
    """Experts per token per layer: the model's, the greedy start's and the searched, with their objective."""
    top_k = report.top_k or {}
    table = Table(
        title=f"top-k per MoE layer (--active-ratio {top_k['active_ratio']}: at most {top_k['budget']} per token "
        f"over the searched layers; {top_k['evaluations']} candidates)",
        title_justify="left",
        highlight=False,
    )
    table.add_column("top-k")
    for layer in report.layers:
        table.add_column(str(layer), justify="right")
    table.add_column("ESAP", justify="right")
    table.add_column("KL", justify="right")
    for name, key in (("model", "full"), ("greedy", "greedy"), ("searched", "searched")):
        values = top_k["values"][key]
        per_layer = top_k["top_k" if key == "searched" else key]
        table.add_row(name, *map(str, per_layer), f"{values['esap']:.4f}", f"{values['kl']:.4f}")
    return table
