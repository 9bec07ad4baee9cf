"""`merge`: shrink every MoE layer to D experts by clustering and merging them (UNCURL, HC-SMoE), or a baseline.

Per layer: similarity S of the experts' router logits (from `profile` statistics), D clusters from
a merge method (`merging.registry`), each cluster's members permutation-aligned to its anchor and
averaged with weights proportional to selection frequency or to their share of the layer's output
(`--weights`), the router cut to D rows. With `refit`, each slot is instead its anchor with a down
projection fitted by least squares to the whole layer's output (`merging.refit`). The output really
is smaller: D expert tensors and a D-row router per layer, loadable by stock transformers. Weights
stream from the shards; only the layer being merged is in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moe_prune.artifacts.stats import Stats as Stats
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.errors import MoePruneError
from moe_prune.merging.clustering import Cluster, mean_similarity
from moe_prune.merging.layer_plan import ROUTER_RULES, LayerPlan
from moe_prune.merging.planning import cluster_layer, layer_counts
from moe_prune.merging.plot import similarity_heatmaps as similarity_heatmaps
from moe_prune.merging.refit import RIDGE, least_squares_down
from moe_prune.merging.registry import NEEDS, LayerStats, get_method, weight_statistic
from moe_prune.merging.similarity import router_similarity
from moe_prune.specs.merge import MergeSpec
from moe_prune.stages.merge_checks import check_refit_options as check_refit_options
from moe_prune.stages.merge_checks import check_stats as check_stats
from moe_prune.stages.refit import has_sums, parse_ridge, refit_layers
from moe_prune.stages.shrink import Shrink, Shrunk


@dataclass
class ClusterReport:
    """One merged slot, in original expert ids."""

    anchor: int
    members: list[int]
    frequencies: list[float]
    weights: list[float]
    similarity: float  # mean pairwise S within the cluster


@dataclass
class LayerReport:
    layer: int
    experts_before: int
    experts_after: int
    skipped: bool
    clusters: list[ClusterReport]
    similarity: np.ndarray | None = None  # S in current slot order (for the heatmap)
    order: list[int] = field(default_factory=list)  # slots ordered by cluster


@dataclass
class MergeResult(Shrunk):
    """What `merge` wrote: the shared counts (`stages.shrink.Shrunk`), its options and every layer's clusters."""

    method: str
    router: str
    weights: str
    refit: bool
    layers: list[LayerReport]
    refit_fits: list = field(default_factory=list)  # merging.refit_pass.LayerFit per layer (sequential refit)

    @property
    def experts_before(self) -> int:
        return max(self.experts_before_per_layer.values())

    @property
    def experts_after(self) -> dict[int, int]:
        return self.experts_after_per_layer

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "method": self.method,
            "router": self.router,
            "weights": self.weights,
            "refit": self.refit,
            "experts_before": self.experts_before,
            "experts_after": {str(k): v for k, v in self.experts_after.items()},
            "layers": [
                {
                    "layer": r.layer,
                    "skipped": r.skipped,
                    "clusters": [vars(c) for c in r.clusters],
                }
                for r in self.layers
            ],
            "refit_layers": [asdict(fit) for fit in self.refit_fits],
        }


def run(
    model: str | Path,
    stats: Stats,
    out: Path,
    keep: int,
    spec: MergeSpec = MergeSpec(),
    *,
    keep_overrides: dict[int, int] | None = None,
    stats_name: str = "stats",
    progress: Callable[[int, int], None] | None = None,
    refit_progress: Callable[[int, int], None] | None = None,
) -> MergeResult:
    """Merge (or prune) to `keep` experts per MoE layer (`keep_overrides`: per layer) as `spec` says; checks first.
    `spec.weights` (`merging.registry.WEIGHTS`) sets what members are averaged in proportion to; `spec.refit` fits
    each slot's down projection to the layer's output instead (`merging.refit`). Multi-token-prediction MoE blocks
    get the last MoE layer's plan (never a refit: the statistics are the decoder layer's), or are removed with
    `drop_mtp`. Without stored refit sums the refit runs one sequential pass (`stages.refit`) on `device` (default
    cpu) keeping `buffer_memory` bytes of hidden states and `refit_memory` bytes of sums in memory; the rest and
    the solved down projections go beside `out` (its disk; $TMPDIR is often RAM). `refit_ridge`: the relative
    ridge (default `merging.refit.RIDGE`) or "auto" (held-out windows, that pass only). All four are refused
    where they would do nothing (without `refit`; with stored sums, but a ridge number).
    """
    s = spec
    get_method(s.method), weight_statistic(s.weights)  # unknown names fail before anything is read
    if s.router not in ROUTER_RULES:
        raise MoePruneError(f"unknown --router {s.router!r}; use one of {', '.join(ROUTER_RULES)}")
    shrink = Shrink(model, out, s.max_shard_size, s.force)
    ckpt = shrink.ckpt
    stored, ridge = _checked(s, stats, ckpt, stats_name)
    current = {layer: ckpt.identity.experts_in(layer) for layer in ckpt.identity.moe_layers}
    skip = sorted(set(s.skip_layers or []))
    counts = layer_counts(current, keep, keep_overrides or {}, skip, ckpt.config.top_k)
    shrink.target(counts, s.drop_mtp, "merge")
    choice = Choice(s.method, s.weights, stored, s.router, s.seed, ridge or RIDGE)
    plans, reports = _plan_layers(stats, ckpt, choice, counts, skip)
    fits = []
    if s.refit and not stored:
        plans, fits = refit_layers(
            model, ckpt, stats, plans, stats_name, ridge=ridge, device=s.device or "cpu",
            buffer_memory=s.buffer_memory, refit_memory=s.refit_memory, expert_memory=s.expert_memory,
            spill=shrink.out.absolute().parent, progress=refit_progress,
        )  # fmt: skip
    step = {"stage": "merge", "source": str(model), "method": s.method, "router": s.router, "weights": s.weights}
    step |= {"refit": s.refit, "keep": {str(k): v for k, v in counts.items()}, "skip_layers": skip}
    step |= {"seed": s.seed, "stats": stats_name}
    verb = "merged alike" if ckpt.identity.moe_layers[-1] in plans else "kept (layer skipped)"
    shrunk = shrink.write(plans, step, verb, progress)
    return MergeResult(**vars(shrunk), method=s.method, router=s.router, weights=s.weights, refit=s.refit,
                       layers=reports, refit_fits=fits)  # fmt: skip


def _checked(s: MergeSpec, stats: Stats, ckpt: Checkpoint, stats_name: str) -> tuple[bool, float | None]:
    """(refit from stored sums, ridge): the refit options and the statistics checked before anything is written."""
    stored = s.refit and has_sums(stats)  # profile --refit-stats sums; else one sequential pass (stages.refit)
    passing = {"--device": s.device, "--buffer-memory": s.buffer_memory, "--refit-memory": s.refit_memory}
    passing["--expert-memory"] = s.expert_memory
    check_refit_options(s.refit, stored, s.refit_ridge, passing, stats_name)
    ridge = parse_ridge(RIDGE if s.refit_ridge is None else s.refit_ridge)
    check_stats(stats, ckpt, s.method, stats_name, s.weights, stored)
    return stored, ridge


@dataclass(frozen=True)
class Choice:
    """How every layer is merged: method, averaging weights, refit, router rule and seed."""

    method: str
    weights: str
    refit: bool
    router: str
    seed: int
    ridge: float = RIDGE


def _plan_layers(
    stats: Stats, ckpt: Checkpoint, choice: Choice, counts: dict[int, int], skip: list[int]
) -> tuple[dict[int, LayerPlan], list[LayerReport]]:
    """Every merged layer's plan, and every layer's report (a skipped layer keeps its experts)."""
    identity = ckpt.identity
    rows = {layer: i for i, layer in enumerate(identity.moe_layers)}
    plans: dict[int, LayerPlan] = {}
    reports: list[LayerReport] = []
    for layer in identity.moe_layers:
        ids = identity.original_ids[layer]
        if layer in skip:
            reports.append(LayerReport(layer, len(ids), len(ids), True, []))
            continue
        plan, report = _plan_layer(stats, rows[layer], ids, layer, choice, counts[layer], ckpt.config.n_group)
        plans[layer] = plan
        reports.append(report)
    return plans, reports


def _plan_layer(
    stats: Stats, row: int, ids: tuple[int, ...], layer: int, choice: Choice, count: int, n_group: int
) -> tuple[LayerPlan, LayerReport]:
    """One layer's clusters, averaging weights and (with a refit) least-squares down projections."""
    n = len(ids)  # a ragged model's statistics are padded to its largest layer
    frequency = np.asarray(stats.arrays["hard_counts"][row][:n], dtype=np.float64)
    gram = stats.arrays.get("logit_gram")
    similarity = router_similarity(gram[row][:n, :n]) if gram is not None else np.eye(n)
    context = LayerStats({k: stats.arrays[k][row][:n] for k in NEEDS[choice.method] if k != "logit_gram"})
    method = get_method(choice.method)
    clusters = cluster_layer(method, similarity, frequency, count, choice.seed, n_group, context)
    basis = weight_statistic(choice.weights) if choice.method != "prune" else "hard_counts"
    averaging = [c.weights(np.asarray(stats.arrays[basis][row][:n], dtype=np.float64)) for c in clusters]
    downs = _refit(stats, row, clusters, choice.ridge) if choice.refit else None
    plan = LayerPlan(layer, clusters, averaging, choice.router, choice.seed, downs)
    return plan, _report(layer, ids, clusters, averaging, frequency, similarity)


def _refit(stats: Stats, row: int, clusters: list[Cluster], ridge: float) -> tuple[np.ndarray, ...]:
    """Each slot's least-squares down projection D^T [I, H], from its anchor's refit sums."""
    hh, hy = stats.arrays["refit_hh"][row], stats.arrays["refit_hy"][row]
    return tuple(least_squares_down(hh[c.anchor], hy[c.anchor], ridge) for c in clusters)


def _report(
    layer: int,
    ids: tuple[int, ...],
    clusters: list[Cluster],
    weights: list[tuple[float, ...]],
    frequency: np.ndarray,
    similarity: np.ndarray,
) -> LayerReport:
    rows = [
        ClusterReport(
            anchor=ids[c.anchor],
            members=[ids[m] for m in c.members],
            frequencies=[float(frequency[m]) for m in c.members],
            weights=list(w),
            similarity=mean_similarity(c, similarity),
        )
        for c, w in zip(clusters, weights, strict=True)
    ]
    order = [m for c in clusters for m in c.members]
    order += [slot for slot in range(len(ids)) if slot not in set(order)]  # dropped experts (prune) last
    return LayerReport(layer, len(ids), len(clusters), False, rows, similarity, order)
