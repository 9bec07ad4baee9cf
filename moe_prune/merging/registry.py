"""The merge methods: each one function (similarity [E, E], frequency [E], count D, seed) -> D clusters.

Add a method by decorating one function with `@merge_method("name")`; the CLI lists what is here.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from moe_prune.merging.clustering import Cluster, clusters_from_labels, spectral_labels
from moe_prune.registry import Registry

MergeMethod = Callable[[np.ndarray, np.ndarray, int, int], list[Cluster]]
METHODS: Registry[MergeMethod] = Registry("merge method")
merge_method = METHODS.decorator  # `@merge_method("name")` registers a method
get_method = METHODS.get_or_fail  # the method called `name`, or one line with a suggestion and the list


def most_used(frequency: np.ndarray, count: int) -> list[int]:
    """The `count` most selected experts (lower id first on ties)."""
    order = sorted(range(len(frequency)), key=lambda e: (-float(frequency[e]), e))
    return sorted(order[:count])


@merge_method("uncurl")
def uncurl(similarity: np.ndarray, frequency: np.ndarray, count: int, seed: int) -> list[Cluster]:
    """UNCURL (Sharma et al. 2024, Algorithm 1): spectral clustering of S into D clusters; the most
    frequently selected member of each cluster is its anchor."""
    return clusters_from_labels(spectral_labels(similarity, count, seed), frequency)


@merge_method("frequency")
def frequency(similarity: np.ndarray, frequency: np.ndarray, count: int, seed: int) -> list[Cluster]:
    """Frequency baseline (UNCURL paper 6.4.1): the D most used experts are anchors; every other expert
    joins the anchor it is most similar to (ties: the lower anchor id)."""
    anchors = most_used(frequency, count)
    groups: dict[int, list[int]] = {a: [a] for a in anchors}
    for expert in range(len(frequency)):
        if expert not in groups:
            groups[max(anchors, key=lambda a: (similarity[expert, a], -a))].append(expert)
    return [Cluster(a, tuple(sorted(groups[a]))) for a in anchors]


@merge_method("prune")
def prune(similarity: np.ndarray, frequency: np.ndarray, count: int, seed: int) -> list[Cluster]:
    """No merging: keep the D most used experts, drop the rest (for side-by-side comparison)."""
    return [Cluster(a, (a,)) for a in most_used(frequency, count)]
