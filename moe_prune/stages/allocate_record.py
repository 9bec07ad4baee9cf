"""The record of an `allocate` search: the report the CLI prints and the mask's provenance.

Kept apart from `stages.allocate` (the search itself), so that each file stays short.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_prune.allocation import plan
from moe_prune.allocation.search import Counts, Trace
from moe_prune.artifacts.mask import DropMask
from moe_prune.scoring.selection import Budget
from moe_prune.stages.allocate_data import Calibration


@dataclass
class AllocationReport:
    """Counts per layer of each start and of the result, their objective values, and what the search cost."""

    criterion: str
    objective: str
    layers: list[int]
    counts: dict[str, list[int]]  # uniform, global (when there is one), searched
    values: dict[str, dict[str, float]]  # the same names -> {"esap": ..., "kl": ...}
    evaluations: int
    accepted: int
    seconds: float
    positions: int
    global_from: str | None
    warnings: list[str] = field(default_factory=list)
    target: dict[str, Any] = field(default_factory=lambda: {"for": "prune"})  # --for merge: method, weights...
    top_k: dict[str, Any] | None = None  # --top-k search: `stages.allocate_topk.TopKResult.to_dict()`

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def report_of(
    name: str,
    objective: str,
    layers: plan.Layers,
    starts: dict[str, Counts],
    trace: Trace,
    measured: dict[Counts, tuple[float, float]],
    positions: int,
    global_from: str | None,
    warnings: list[str],
) -> AllocationReport:
    named = {**starts, "searched": trace.best}
    return AllocationReport(
        criterion=name,
        objective=objective,
        layers=list(layers.numbers),
        counts={k: list(v) for k, v in named.items()},
        values={k: {"esap": measured[v][0], "kl": measured[v][1]} for k, v in named.items()},
        evaluations=trace.evaluations,
        accepted=trace.accepted,
        seconds=0.0,
        positions=positions,
        global_from=global_from,
        warnings=warnings,
    )


def drop_mask(
    identity: Any,
    layers: plan.Layers,
    table: plan.DropTable,
    trace: Trace,
    report: AllocationReport,
    budget: Budget | int,
    calibration: Calibration,
    facts: dict[str, Any],
    stats: str | Path,
    top_k: Counts | None = None,
) -> DropMask:
    """The searched counts as a drop mask (the criterion's drops in each layer), with the search's record;
    `top_k`: the searched experts per token of each layer (`--top-k search`), written into the mask."""
    ids = identity.original_ids
    drops = table.drops(trace.best)
    keep = {
        n: [e for slot, e in enumerate(ids[n]) if slot not in set(d)]
        for n, d in zip(layers.numbers, drops, strict=True)
    }
    params: dict[str, Any] = {
        "direction": table.direction,
        **allocation_record(report, budget, calibration, facts, stats),
    }
    per_layer = None if top_k is None else dict(zip(layers.numbers, top_k, strict=True))
    return DropMask.create(identity, keep, report.criterion, params, per_layer)


def allocation_record(
    report: AllocationReport, budget: Budget | int, calibration: Calibration, facts: dict[str, Any], stats: str | Path
) -> dict[str, Any]:
    """The search's record: budget, objective values of the starts and the result, evaluations, calibration."""
    return {
        **(budget.to_dict() if isinstance(budget, Budget) else {"bytes": budget}),
        "allocation": {
            "objective": report.objective,
            "values": report.values,
            "counts": report.counts,
            "evaluations": report.evaluations,
            **facts,
            "global_from": report.global_from,
            "calibration": {k: v for k, v in calibration.__dict__.items() if k not in ("device",)},
            "positions": report.positions,
            **({"target": report.target} if report.target["for"] != "prune" else {}),
            **({"top_k": report.top_k} if report.top_k is not None else {}),
        },
        "stats": str(stats),
    }
