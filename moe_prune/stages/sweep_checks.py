"""What `sweep` refuses before it builds anything: unknown criteria, ratios below top-k, statistics that serve
none of the asked combinations (the others become skipped rows)."""

from __future__ import annotations

from moe_prune.artifacts.stats import Stats
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.errors import MoePruneError
from moe_prune.scoring import Criterion, all_criteria, get_criterion
from moe_prune.scoring.selection import Budget
from moe_prune.stages import merge


def sweep_criteria(names: tuple[str, ...]) -> list[Criterion]:
    """The named criteria (unknown names fail with "did you mean"); `random` is the floor, never a line."""
    chosen = [get_criterion(n) for n in names] if names else all_criteria()
    return [c for c in chosen if c.name != "random"]


def check_ratios(ckpt: Checkpoint, ratios: tuple[float, ...]) -> None:
    """Every ratio must leave each layer at least top-k experts (the count score and merge would keep)."""
    top_k = ckpt.config.top_k
    for ratio in ratios:
        for layer in ckpt.identity.moe_layers:
            n = ckpt.identity.experts_in(layer)
            kept = n - Budget(ratio=ratio).drops(n, f"in layer {layer}")
            if kept < top_k:
                raise MoePruneError(
                    f"--ratios {ratio:g} keeps {kept} of the {n} experts of layer {layer}, fewer than top-k {top_k}"
                )


def check_usable(criteria: list[Criterion], methods: list[str], stats: Stats, ckpt: Checkpoint, name: str) -> None:
    """Refuse a sweep whose every criterion and merge method the statistics cannot serve (others: skipped rows)."""
    reasons = []
    for crit in criteria:
        missing = [s for s in crit.stats if s not in stats.arrays]
        if missing:
            reasons.append(f"{crit.name} needs {', '.join(missing)}")
    for method in methods:
        try:
            merge.check_stats(stats, ckpt, method, name)  # weights and refit: skipped rows with merge's reason
        except MoePruneError as exc:
            reasons.append(str(exc))
    if reasons and len(reasons) == len(criteria) + len(methods):
        raise MoePruneError(f"{name}: serves none of the criteria and merge methods asked for ({'; '.join(reasons)})")
