"""`score`: rate every routed expert with a criterion and choose which to drop, as a drop mask.

Library entry point: `score(stats, model, criterion, ...) -> (DropMask, ScoreReport)`. Everything that can be
checked (inputs present, same model, budget vs top-k and routing groups) is checked before any weight is read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moe_prune.architectures import get_adapter
from moe_prune.artifacts.identity import ModelIdentity
from moe_prune.artifacts.mask import DropMask
from moe_prune.artifacts.stats import Stats
from moe_prune.checkpoint.expert_weights import ExpertWeights
from moe_prune.checkpoint.output import atomic_file
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.errors import MoePruneError
from moe_prune.scoring import Criterion, Inputs, get_criterion
from moe_prune.scoring.registry import Direction
from moe_prune.scoring.selection import (
    Budget,
    expert_order,
    global_drops,
    group_quota,
    pick_by_order,
    pick_by_pairs,
)


@dataclass
class ScoreReport:
    """Scores and choices per MoE layer (original expert ids), for tables and `--json`."""

    criterion: str
    direction: Direction
    kind: str
    source: str
    original_ids: dict[int, tuple[int, ...]]
    scores: dict[int, list[float]]  # per expert slot; pair criteria: the experts' usage (hard counts)
    dropped: dict[int, list[int]]  # original ids, in the order they were chosen
    pairs: dict[int, list[tuple[int, int, float]]] = field(default_factory=dict)  # pair criteria: (p, q, value)
    params: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        def number(x: float) -> float | str:
            return x if np.isfinite(x) else str(x)

        return {
            "criterion": self.criterion,
            "direction": self.direction,
            "kind": self.kind,
            "source": self.source,
            "params": self.params,
            "layers": {
                str(layer): {
                    "original_ids": list(ids),
                    "scores": [number(s) for s in self.scores[layer]],
                    "dropped": self.dropped[layer],
                    "kept": [i for i in ids if i not in set(self.dropped[layer])],
                    **({"pairs": [list(p) for p in self.pairs[layer]]} if layer in self.pairs else {}),
                }
                for layer, ids in self.original_ids.items()
            },
            "warnings": self.warnings,
        }


def score(
    stats: Stats | str | Path | None,
    model: str | Path | None,
    criterion: str,
    direction: Direction | None = None,
    budget: Budget | None = None,
    global_: bool = False,
    min_keep: int | None = None,
    seed: int = 0,
    stats_name: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    protect_super_experts: bool = False,
) -> tuple[DropMask, ScoreReport]:
    """Score experts with `criterion` and drop per `budget` (per layer, or over all layers with `global_`).

    `stats` is a Stats object or a path (or None for weight criteria); `model` a checkpoint folder or hub id
    (needed by weight criteria; with statistics it must be the same model). `progress(done, total)` reports
    MoE layers read by weight criteria.
    """
    crit = get_criterion(criterion)
    direction = direction or crit.direction
    if direction not in ("min", "max"):
        raise MoePruneError(f"--direction must be min or max, not {direction!r}")
    budget = budget or Budget(drop=0)
    if global_ and not crit.global_ok:
        comparable = ", ".join(c.name for c in _global_criteria())
        raise MoePruneError(
            f"criterion {crit.name!r} gives scores that are not comparable across layers, so --global is "
            f"refused; criteria that support it: {comparable}"
        )
    if isinstance(stats, (str, Path)):
        stats_name = stats_name or str(stats)
        stats = Stats.load(Path(stats))
    stats_name = stats_name or "stats"
    ckpt = Checkpoint.open(model) if model is not None else None
    identity = _identity(crit, stats, ckpt, stats_name)
    warnings: list[str] = []
    top_k = _top_k(stats, ckpt, warnings)
    n_group = _n_group(stats, ckpt, identity)

    counts = [identity.experts_in(layer) for layer in identity.moe_layers]  # differ in a ragged model
    if global_:
        if n_group > 1:
            raise MoePruneError(f"--global is not supported with grouped routing ({n_group} groups per layer)")
        floor = _floor(min_keep, top_k)
        total = budget.drops(sum(counts), "in all MoE layers together")
    else:
        if min_keep is not None:
            raise MoePruneError("--min-keep only applies with --global")
        n_drops = [budget.drops(n, "per layer") for n in counts]
        for layer, n, n_drop in zip(identity.moe_layers, counts, n_drops, strict=True):
            if top_k is not None and n - n_drop < top_k:
                raise MoePruneError(
                    f"dropping {n_drop} of {n} experts in layer {layer} keeps {n - n_drop}, fewer than top-k {top_k}"
                )
        quotas = [
            group_quota(n, n_group, n_drop, layer)
            for layer, n, n_drop in zip(identity.moe_layers, counts, n_drops, strict=True)
        ]

    weights = ExpertWeights(ckpt, progress) if crit.weights and ckpt else None
    inputs = Inputs(identity, stats, weights, seed, _vocab(stats, ckpt))
    scores, usage, values = _run(crit, inputs, inputs.shape, inputs.real())
    protected = _super_experts(stats, stats_name, counts) if protect_super_experts else set()
    if global_:
        drops, pairs = global_drops(scores, direction, total, floor, counts, protected), {}
    else:
        quotas = [_unprotected(quota, index, protected) for index, quota in enumerate(quotas)]
        drops, pairs = _layerwise(identity, scores, usage, values, direction, n_drops, quotas)

    dropped = {
        layer: [identity.original_ids[layer][slot] for slot in drops[i]] for i, layer in enumerate(identity.moe_layers)
    }
    keep = {layer: [i for i in identity.original_ids[layer] if i not in set(d)] for layer, d in dropped.items()}
    params: dict[str, Any] = {
        "direction": direction,
        **budget.to_dict(),
        "global": global_,
        "min_keep": floor if global_ else None,
        "seed": seed if crit.name == "random" else None,
        "protected_super_experts": sorted(identity.original_ids[identity.moe_layers[i]][s] for i, s in protected)
        if protect_super_experts
        else None,
        "top_k": top_k,
        "stats": stats_name if stats is not None else None,
        "model": str(model) if model is not None else None,
    }
    mask = DropMask.create(identity, keep, crit.name, params)
    mask.validate_groups(n_group, "mask")
    shown = usage if values is not None else scores
    report = ScoreReport(
        criterion=crit.name,
        direction=direction,
        kind=crit.kind,
        source=crit.source,
        original_ids=dict(sorted(identity.original_ids.items())),
        scores={layer: [float(s) for s in shown[i][: counts[i]]] for i, layer in enumerate(identity.moe_layers)},
        dropped=dropped,
        pairs=pairs,
        params=params,
        warnings=warnings,
    )
    return mask, report


def _layerwise(
    identity: ModelIdentity,
    scores: np.ndarray,
    usage: np.ndarray | None,
    values: np.ndarray | None,
    direction: Direction,
    n_drops: list[int],
    quotas: list[Callable[[int, list[int]], bool]],
) -> tuple[list[list[int]], dict[int, list[tuple[int, int, float]]]]:
    """Slots to drop per layer (in choice order), and for pair criteria the pairs chosen (original ids).

    Each layer is scored over its own experts only (a ragged model's padding slots are never candidates).
    """
    drops: list[list[int]] = []
    pairs: dict[int, list[tuple[int, int, float]]] = {}
    for index, layer in enumerate(identity.moe_layers):
        n, n_drop = identity.experts_in(layer), n_drops[index]
        if values is not None:
            assert usage is not None
            chosen, chosen_pairs = pick_by_pairs(
                values[index][:n, :n], usage[index][:n], direction, n_drop, quotas[index]
            )
            ids = identity.original_ids[layer]
            pairs[layer] = [(ids[p], ids[q], v) for p, q, v in chosen_pairs]
        else:
            chosen = pick_by_order(expert_order(scores[index][:n], direction), n_drop, quotas[index])
        if len(chosen) < n_drop:
            raise MoePruneError(
                f"layer {layer}: only {len(chosen)} of the {n_drop} experts to drop may go (the others are protected "
                "super experts or routing-group quotas); drop fewer or leave out --protect-super-experts"
            )
        drops.append(chosen)
    return drops, pairs


def write_mask(mask: DropMask, out: Path, force: bool = False, inputs: tuple[str | Path, ...] = ()) -> None:
    """Write the mask JSON atomically (parents created, as prune and merge do); refuse to overwrite without force."""
    out = Path(out)
    if out.is_dir():
        raise MoePruneError(f"{out}: is a folder; give a file name for the mask")
    with atomic_file(out, force, protect=tuple(Path(p) for p in inputs)) as tmp:
        tmp.write_text(mask.dumps())


def _identity(crit: Criterion, stats: Stats | None, ckpt: Checkpoint | None, stats_name: str) -> ModelIdentity:
    """The scored model; refuses missing inputs and statistics of another model."""
    if crit.stats and stats is None:
        raise MoePruneError(
            f"criterion {crit.name!r} reads statistics ({', '.join(crit.stats)}); pass a STATS file "
            "(produce it with `moe-prune profile`)"
        )
    if crit.weights and ckpt is None:
        raise MoePruneError(f"criterion {crit.name!r} reads expert weights; pass the checkpoint with --model")
    if stats is None and ckpt is None:
        raise MoePruneError("pass a STATS file, --model, or both")
    if stats is not None:
        stats.require(*crit.stats, source=stats_name)
        if ckpt is not None:
            stats.identity.require_same(ckpt.identity, stats_name, str(ckpt.folder))
        return stats.identity
    assert ckpt is not None
    return ckpt.identity


def _top_k(stats: Stats | None, ckpt: Checkpoint | None, warnings: list[str]) -> int | None:
    """From config.json, else the statistics: each token selects exactly k experts, so k = sum(counts) / tokens."""
    if ckpt is not None:
        return ckpt.config.top_k
    if stats is not None:
        if "top_k" in stats.provenance:
            return int(stats.provenance["top_k"])
        if {"hard_counts", "tokens"} <= set(stats.arrays) and stats.arrays["tokens"].min() > 0:
            per_token = stats.arrays["hard_counts"].sum(axis=-1) / stats.arrays["tokens"]
            return round(float(per_token.max()))
    warnings.append("top-k unknown (pass --model); only checked that every layer keeps an expert")
    return None


def _n_group(stats: Stats | None, ckpt: Checkpoint | None, identity: ModelIdentity) -> int:
    """Routing groups per layer: from config.json; families without grouped routing have 1."""
    if ckpt is not None:
        return ckpt.config.n_group
    if not get_adapter(identity.model_type).routing.grouped:
        return 1
    if stats is not None and "n_group" in stats.provenance:
        return int(stats.provenance["n_group"])
    raise MoePruneError(f"{identity.model_type} may route within expert groups; pass --model so the groups are known")


def _floor(min_keep: int | None, top_k: int | None) -> int:
    """Fewest experts a layer may keep under --global: --min-keep, never below top-k (default top-k)."""
    if min_keep is not None and min_keep < 1:
        raise MoePruneError(f"--min-keep {min_keep} must be at least 1")
    if min_keep is not None and top_k is not None and min_keep < top_k:
        raise MoePruneError(f"--min-keep {min_keep} is below top-k {top_k}; a layer must keep at least top-k experts")
    return min_keep if min_keep is not None else (top_k or 1)


def _vocab(stats: Stats | None, ckpt: Checkpoint | None) -> int | None:
    if ckpt is not None:
        vocab = ckpt.config.get("vocab_size")
        return vocab if isinstance(vocab, int) else None
    return stats.provenance.get("vocab_size") if stats is not None else None


def _run(
    crit: Criterion, inputs: Inputs, shape: tuple[int, int], real: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(scores [L, E], usage, pair values): run the criterion and check what it returned.

    `real` marks the slots that hold experts; a ragged model's padding may score anything and is ignored.
    """
    if crit.kind == "pair":
        values, usage = crit.fn(inputs)
        values, usage = np.asarray(values, dtype=np.float64), np.asarray(usage, dtype=np.float64)
        assert values.shape == (*shape, shape[1]) and usage.shape == shape, (values.shape, usage.shape)
        checked = values
    else:
        usage = values = None
        checked = np.asarray(crit.fn(inputs), dtype=np.float64)
        assert checked.shape == shape, (crit.name, checked.shape, shape)
    real_pairs = real[:, :, None] & real[:, None, :] if checked.ndim == 3 else real
    bad = np.argwhere(np.isnan(checked) & real_pairs)
    if bad.size:
        raise MoePruneError(
            f"criterion {crit.name!r} gave NaN scores (first at MoE layer index {bad[0][0]}); "
            "the statistics may be corrupt"
        )
    return (checked if values is None else usage), usage, values


SUPER_EXPERT_PERCENTILE = 99.5  # REAP's thresholds (CerebrasResearch/reap, get_super_expert_indices)
SUPER_EXPERT_FRACTION_OF_MAX = 10.0
SUPER_EXPERT_LAYER_SHARE = 0.75


def _super_experts(stats: Stats | None, stats_name: str, counts: list[int]) -> set[tuple[int, int]]:
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


def _unprotected(
    quota: Callable[[int, list[int]], bool], index: int, protected: set[tuple[int, int]]
) -> Callable[[int, list[int]], bool]:
    """The layer's quota, and never a protected slot."""
    return lambda slot, dropped: (index, slot) not in protected and quota(slot, dropped)


def _global_criteria() -> list[Criterion]:
    from moe_prune.scoring import all_criteria

    return [c for c in all_criteria() if c.global_ok]
