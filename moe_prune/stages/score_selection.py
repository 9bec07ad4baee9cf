"""The drop rule of `score`: a budget per layer or over all layers, checked against top-k and routing groups.

Built before any score is computed, so an impossible budget is one line before any weight is read;
REAP's super experts (massive activations) can be protected from every drop.
"""

from __future__ import annotations

import numpy as np

from moe_prune.artifacts.identity import ModelIdentity
from moe_prune.artifacts.stats import Stats
from moe_prune.errors import MoePruneError
from moe_prune.scoring.registry import Direction
from moe_prune.scoring.selection import Budget, Selection, group_quota


def selection_rule(
    identity: ModelIdentity,
    direction: Direction,
    budget: Budget,
    global_: bool,
    min_keep: int | None,
    top_k: int | None,
    n_group: int,
    protected: set[tuple[int, int]],
) -> Selection:
    """The drop rule, checked against top-k and routing groups before any score is computed."""
    layers = tuple(identity.moe_layers)
    counts = tuple(identity.experts_in(layer) for layer in layers)
    if global_:
        if n_group > 1:
            raise MoePruneError(f"--global is not supported with grouped routing ({n_group} groups per layer)")
        floor = _floor(min_keep, top_k)
        total = budget.drops(sum(counts), "in all MoE layers together")
        return Selection(direction, layers, counts, total=total, floor=floor, protected=frozenset(protected))
    if min_keep is not None:
        raise MoePruneError("--min-keep only applies with --global")
    n_drops = tuple(budget.drops(n, "per layer") for n in counts)
    for layer, n, n_drop in zip(layers, counts, n_drops, strict=True):
        if top_k is not None and n - n_drop < top_k:
            raise MoePruneError(
                f"dropping {n_drop} of {n} experts in layer {layer} keeps {n - n_drop}, fewer than top-k {top_k}"
            )
    quotas = tuple(group_quota(n, n_group, d, layer) for layer, n, d in zip(layers, counts, n_drops, strict=True))
    return Selection(direction, layers, counts, n_drops, quotas, protected=frozenset(protected))


def _floor(min_keep: int | None, top_k: int | None) -> int:
    """Fewest experts a layer may keep under --global: --min-keep, never below top-k (default top-k)."""
    if min_keep is not None and min_keep < 1:
        raise MoePruneError(f"--min-keep {min_keep} must be at least 1")
    if min_keep is not None and top_k is not None and min_keep < top_k:
        raise MoePruneError(f"--min-keep {min_keep} is below top-k {top_k}; a layer must keep at least top-k experts")
    return min_keep if min_keep is not None else (top_k or 1)


SUPER_EXPERT_PERCENTILE = 99.5  # REAP's thresholds (CerebrasResearch/reap, get_super_expert_indices)
SUPER_EXPERT_FRACTION_OF_MAX = 10.0
SUPER_EXPERT_LAYER_SHARE = 0.75


def super_experts(stats: Stats | None, stats_name: str, counts: list[int]) -> set[tuple[int, int]]:
    """(MoE layer index, slot) of REAP's super experts: an expert's largest |output| above both the 99.5th
    percentile over every expert of every MoE layer and a tenth of the largest, in the first 75% of MoE layers
    (massive activations; dropping one breaks the model, REAP section 4)."""
    if stats is None:
        raise MoePruneError("--protect-super-experts needs a statistics file (the experts' largest outputs)")
    stats.require("act_max", source=stats_name)
    act_max = np.asarray(stats.arrays["act_max"], dtype=np.float64)
    real = [act_max[i, :n] for i, n in enumerate(counts)]
    values = np.concatenate(real)
    threshold = max(np.percentile(values, SUPER_EXPERT_PERCENTILE), values.max() / SUPER_EXPERT_FRACTION_OF_MAX)
    layers = int(len(counts) * SUPER_EXPERT_LAYER_SHARE)
    return {(i, int(s)) for i in range(layers) for s in np.flatnonzero(real[i] > threshold)}
