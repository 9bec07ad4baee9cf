"""The merge methods: each one function (similarity [E, E], frequency [E], count D, seed, context) -> D clusters.

Add a method by decorating one function with `@merge_method("name", needs=(...))`; `needs` names the
statistics it reads beyond the selection counts, so `merge` refuses a file without them before any
work (and says which `profile` run writes them). A method that needs per-expert statistics other than
S and the frequencies reads them from `context` (a `LayerStats`: rows of one layer's arrays, one per
expert, sliced to a routing group when the model groups its experts). The CLI lists what is here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from moe_prune.errors import MoePruneError
from moe_prune.merging.clustering import Cluster, clusters_from_labels, hierarchical_labels, spectral_labels
from moe_prune.registry import Registry


@dataclass(frozen=True)
class LayerStats:
    """Per-expert statistics of one MoE layer (statistic name -> [E, ...]) beyond S and the frequencies."""

    rows: dict[str, np.ndarray] = field(default_factory=dict)

    def subset(self, ids: np.ndarray) -> LayerStats:
        """The rows of experts `ids` (a routing group), in that order."""
        return LayerStats({name: array[ids] for name, array in self.rows.items()})

    def __getitem__(self, name: str) -> np.ndarray:
        return self.rows[name]


class MergeMethod(Protocol):
    def __call__(
        self, similarity: np.ndarray, frequency: np.ndarray, count: int, seed: int, context: LayerStats = ...
    ) -> list[Cluster]: ...


METHODS: Registry[MergeMethod] = Registry("merge method")
get_method = METHODS.get_or_fail  # the method called `name`, or one line with a suggestion and the list
NEEDS: dict[str, tuple[str, ...]] = {}  # method -> statistics it reads (besides hard_counts)
# Where each statistic a merge option reads comes from, for the refusal when a file lacks it.
PRODUCED_BY = {
    "logit_gram": "moe-prune profile",
    "act_weighted_norm_sum": "moe-prune profile",
    "out_all_sum": "moe-prune profile --expert-outputs",
    "refit_hh": "moe-prune profile --refit-stats",
    "refit_hy": "moe-prune profile --refit-stats",
}
# --weights: the per-expert quantity a cluster's members are averaged in proportion to.
WEIGHTS = {
    "frequency": "hard_counts",  # top-k selections (UNCURL, HC-SMoE `merge=freq`)
    "output": "act_weighted_norm_sum",  # sum over routed tokens of gate x output norm: the expert's share of the output
}


def merge_method(name: str, needs: tuple[str, ...] = ("logit_gram",)) -> Callable[[MergeMethod], MergeMethod]:
    """`@merge_method("name", needs=(...))` registers the decorated function and the statistics it reads."""

    def register(fn: MergeMethod) -> MergeMethod:
        NEEDS[name] = needs
        return METHODS.add(name, fn)

    return register


def weight_statistic(rule: str) -> str:
    """The statistic behind `--weights rule`, or one line listing the rules."""
    if rule not in WEIGHTS:
        raise MoePruneError(f"unknown --weights {rule!r}; use one of {', '.join(WEIGHTS)}")
    return WEIGHTS[rule]


def most_used(frequency: np.ndarray, count: int) -> list[int]:
    """The `count` most selected experts (lower id first on ties)."""
    order = sorted(range(len(frequency)), key=lambda e: (-float(frequency[e]), e))
    return sorted(order[:count])


@merge_method("uncurl")
def uncurl(
    similarity: np.ndarray, frequency: np.ndarray, count: int, seed: int, context: LayerStats = LayerStats()
) -> list[Cluster]:
    """UNCURL (Sharma et al. 2024, Algorithm 1): spectral clustering of S into D clusters; the most
    frequently selected member of each cluster is its anchor."""
    return clusters_from_labels(spectral_labels(similarity, count, seed), frequency)


@merge_method("frequency")
def frequency(
    similarity: np.ndarray, frequency: np.ndarray, count: int, seed: int, context: LayerStats = LayerStats()
) -> list[Cluster]:
    """Frequency baseline (UNCURL paper 6.4.1): the D most used experts are anchors; every other expert
    joins the anchor it is most similar to (ties: the lower anchor id)."""
    anchors = most_used(frequency, count)
    groups: dict[int, list[int]] = {a: [a] for a in anchors}
    for expert in range(len(frequency)):
        if expert not in groups:
            groups[max(anchors, key=lambda a: (similarity[expert, a], -a))].append(expert)
    return [Cluster(a, tuple(sorted(groups[a]))) for a in anchors]


@merge_method("hcsmoe", needs=("out_all_sum",))
def hcsmoe(
    similarity: np.ndarray, frequency: np.ndarray, count: int, seed: int, context: LayerStats = LayerStats()
) -> list[Cluster]:
    """HC-SMoE (Chen et al., ICML 2025): average-linkage hierarchical clustering of the experts' mean
    outputs over ALL calibration tokens (Euclidean), cut at D clusters; wazenmai/HC-SMoE,
    hcsmoe/merging/grouping_mixtral.py `group_experts_by_clustering_output` and clustering.py
    `hierarchical_clustering` (scripts/mixtral/run.sh: --similarity_base expert-output --linkage average).
    Deterministic (no seed). The anchor (alignment target, router row) is the most used member."""
    return clusters_from_labels(hierarchical_labels(context["out_all_sum"], count), frequency)


@merge_method("prune", needs=())
def prune(
    similarity: np.ndarray, frequency: np.ndarray, count: int, seed: int, context: LayerStats = LayerStats()
) -> list[Cluster]:
    """No merging: keep the D most used experts, drop the rest (for side-by-side comparison)."""
    return [Cluster(a, (a,)) for a in most_used(frequency, count)]
