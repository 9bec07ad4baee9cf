"""What an `AllocateSpec` asks `allocate` for: the merge target, the top-k search's share and the budget,
each option checked (and the combinations that would silently do nothing refused) before anything is read."""

from __future__ import annotations

from pathlib import Path

from moe_prune.allocation.objective import OBJECTIVES
from moe_prune.errors import MoePruneError
from moe_prune.scoring.selection import Budget
from moe_prune.sizes import parse_size
from moe_prune.specs.allocate import AllocateSpec
from moe_prune.stages.allocate_data import Calibration
from moe_prune.stages.allocate_merge import MergeTarget

SEQUENTIAL_REFUSAL = (
    "allocate --sequential is not supported: each candidate is a whole forward pass, so one layer at a time would "
    "read the checkpoint from disk once per candidate; use --device auto (GPUs) or score --global"
)


def choices(stats: str | Path | None, spec: AllocateSpec) -> tuple[MergeTarget | None, float | None, Budget | int]:
    """(merge target or None for a drop mask, --active-ratio or None, the budget: experts or bytes)."""
    if spec.sequential:
        raise MoePruneError(SEQUENTIAL_REFUSAL)
    if stats is None:
        raise MoePruneError("pass --stats STATS (produce it with `moe-prune profile`)")
    target = merge_target(spec)
    active = active_ratio(spec.top_k, spec.active_ratio)
    if spec.criterion is None and target is None:
        raise MoePruneError("pass --criterion NAME (see `moe-prune score --list`)")
    if [spec.ratio, spec.keep, spec.bytes_].count(None) != 2:
        raise MoePruneError("give exactly one of --ratio R, --keep N or --bytes SIZE")
    if spec.bytes_ is not None:
        return target, active, parse_size(spec.bytes_, "--bytes")
    return target, active, Budget(keep=spec.keep, ratio=spec.ratio)


def merge_target(spec: AllocateSpec) -> MergeTarget | None:
    """--for merge and its options; the options without it are refused."""
    if spec.for_ not in ("prune", "merge"):
        raise MoePruneError(f"--for {spec.for_!r}: use prune or merge")
    if spec.for_ == "prune":
        options = (("--method", spec.method), ("--weights", spec.weights), ("--merge-seed", spec.merge_seed))
        given = [name for name, value in options if value]
        if given or spec.refit:
            raise MoePruneError(f"{', '.join(given + ['--refit'] * spec.refit)} apply to --for merge only")
        return None
    return MergeTarget(spec.method or "uncurl", spec.weights or "frequency", spec.refit, spec.merge_seed or 0)


def active_ratio(top_k: str, ratio: float | None) -> float | None:
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


def check_numbers(objective: str, budget_evals: int, calibration: Calibration) -> None:
    """The objective's name and the counts' lower bounds, before anything is read."""
    if objective not in OBJECTIVES:
        raise MoePruneError(f"--objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")
    for name, value, least in (
        ("--budget-evals", budget_evals, 2),
        ("--samples", calibration.samples, 1),
        ("--top-logprobs", calibration.top, 1),
        ("--batch-size", calibration.batch_size, 1),
    ):
        if value < least:
            raise MoePruneError(f"{name} must be at least {least} (got {value})")
