"""`sweep --global search`: a row whose per-layer counts `allocate` searched, built like any other row.

A criterion's row: `allocate -c C --ratio R` (the criterion's order inside a layer, counts searched on the
statistics' own calibration windows, never the held-out text the sweep evaluates on) -> `prune`. A merge
row: `allocate --for merge --method M [--weights W] [--refit]` -> `merge` with the searched counts. The
search uses `allocate`'s defaults but for `--budget-evals` (`--search-evals`), so the row's command rebuilds
the same model; its allocation is recorded nowhere but in the row's counts (`kept`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from moe_prune.errors import MoePruneError
from moe_prune.scoring import get_criterion
from moe_prune.specs.allocate import AllocateSpec
from moe_prune.specs.merge import MergeSpec
from moe_prune.stages import allocate, merge, prune
from moe_prune.sweep.plan import Combo


def searched(plan: Any, combo: Combo, target: Path) -> tuple[dict[int, int], Path]:
    """(experts per MoE layer, checkpoint folder) of a `search` combination; `plan` is the sweep's Plan."""
    s = plan.settings
    spec = AllocateSpec(
        ratio=combo.ratio, budget_evals=combo.evals or 32, dtype=s.dtype, device=s.device,
        trust_remote_code=s.trust_remote_code,
    )  # fmt: skip
    source = plan.ckpt.folder
    if combo.kind == "prune":
        if combo.direction != get_criterion(combo.name).direction:
            raise MoePruneError(
                f"allocate keeps {combo.name}'s own order ({get_criterion(combo.name).direction}) inside a layer; "
                f"no searched allocation for {combo.direction}"
            )
        mask, _ = allocate.allocate(plan.stats_name, source, replace(spec, criterion=combo.name))
        assert not isinstance(mask, allocate.MergeAllocation)
        prune.run(source, mask, target, force=True, mask_name=combo.line)
        return {layer: len(kept) for layer, kept in mask.keep.items()}, target
    way = {
        "for_": "merge",
        "method": combo.name,
        "weights": combo.weights,
        "refit": combo.refit,
        "merge_seed": combo.seed,
    }
    found, _ = allocate.allocate(plan.stats_name, source, replace(spec, criterion=_ranking(plan), **way))
    assert isinstance(found, allocate.MergeAllocation)
    return merge_to_counts(plan, combo, target, found.keep), target


def merge_to_counts(plan: Any, combo: Combo, target: Path, counts: dict[int, int]) -> dict[int, int]:
    """Merge `combo` into `target` keeping `counts[layer]` experts per layer (the most common count as --keep)."""
    keep = Counter(counts.values()).most_common(1)[0][0]
    merge.run(
        plan.ckpt.folder,
        plan.stats,
        target,
        keep,
        MergeSpec(method=combo.name, weights=combo.weights, refit=combo.refit, seed=combo.seed or 0, force=True),
        keep_overrides={layer: n for layer, n in counts.items() if n != keep},
        stats_name=plan.stats_name,
    )
    return dict(counts)


def _ranking(plan: Any) -> str:
    """The criterion a merge search's global start ranks experts by: soft counts where profiled, else usage."""
    return allocate.GLOBAL_FALLBACK if "soft_counts" in plan.stats.arrays else "usage-frequency"
