"""Per-layer decisions before any weight is read: how many experts each layer keeps, and its clusters."""

from __future__ import annotations

import numpy as np

from moe_prune.errors import MoePruneError
from moe_prune.merging.clustering import Cluster
from moe_prune.merging.registry import LayerStats, MergeMethod


def layer_counts(
    current: dict[int, int], keep: int, overrides: dict[int, int], skip: list[int], top_k: int
) -> dict[int, int]:
    """Experts per MoE layer after merging: `keep`, a per-layer override, or unchanged for skipped layers.

    Refuses layers that are not MoE layers, a count above the layer's current count, and a count
    below top-k (every token must still find top-k experts).
    """
    unknown = sorted((set(overrides) | set(skip)) - set(current))
    if unknown:
        raise MoePruneError(f"layers {unknown} are not MoE layers of the model (MoE layers: {sorted(current)})")
    both = sorted(set(overrides) & set(skip))
    if both:
        raise MoePruneError(f"layers {both} are both skipped and given a --keep count")
    counts = {}
    for layer, experts in sorted(current.items()):
        count = experts if layer in skip else overrides.get(layer, keep)
        if count > experts:
            raise MoePruneError(f"--keep {count} for layer {layer} is more than its {experts} experts")
        if count < top_k:
            raise MoePruneError(f"--keep {count} for layer {layer} is below top-k {top_k}; keep at least {top_k}")
        counts[layer] = count
    return counts


def cluster_layer(
    method: MergeMethod,
    similarity: np.ndarray,
    frequency: np.ndarray,
    count: int,
    seed: int,
    n_group: int = 1,
    context: LayerStats | None = None,
) -> list[Cluster]:
    """`count` clusters of one layer's experts, sorted by anchor slot; `context` holds the other statistics.

    Grouped routing (n_group > 1): experts are clustered within their own routing group, count / n_group
    clusters per group, so merged slot j still belongs to group j // (count / n_group). The count must
    divide into the groups, with at least 2 per group (the group score sums its top 2 experts).
    """
    n = len(frequency)
    if n_group > 1 and (n % n_group or count % n_group or count // n_group < 2):
        raise MoePruneError(
            f"grouped routing with {n_group} groups of {n // n_group} experts: --keep must be a multiple of "
            f"{n_group} with at least 2 per group (got {count})"
        )
    size, per_group = n // n_group, count // n_group
    clusters: list[Cluster] = []
    for group in range(n_group):
        ids = np.arange(group * size, (group + 1) * size)
        rows = (context or LayerStats()).subset(ids)
        local = method(similarity[np.ix_(ids, ids)], frequency[ids], per_group, seed, rows)
        clusters += [Cluster(int(ids[c.anchor]), tuple(int(ids[m]) for m in c.members)) for c in local]
    _check(clusters, count, n)
    return sorted(clusters, key=lambda c: c.anchor)


def _check(clusters: list[Cluster], count: int, n: int) -> None:
    """A method must return `count` disjoint clusters of known experts, each holding its anchor."""
    members = [m for c in clusters for m in c.members]
    if (
        len(clusters) != count
        or len(set(members)) != len(members)
        or any(c.anchor not in c.members for c in clusters)
        or any(not 0 <= m < n for m in members)
    ):
        raise AssertionError(f"merge method returned invalid clusters {clusters} for {count} of {n} experts")
