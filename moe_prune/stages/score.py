"""`score`: rate every routed expert with a criterion and choose which to drop, as a drop mask.

Library entry point: `score(stats, model, criterion, ...) -> (DropMask, ScoreReport)`. Everything that can be
checked (inputs present, same model, budget vs top-k and routing groups) is checked before any weight is read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moe_prune.architectures import get_adapter
from moe_prune.artifacts.identity import ModelIdentity
from moe_prune.artifacts.mask import DropMask
from moe_prune.artifacts.stats import STAT_FIELDS, Stats
from moe_prune.checkpoint.expert_weights import ExpertWeights
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.errors import MoePruneError
from moe_prune.io.output import atomic_file
from moe_prune.scoring import Criterion, Inputs, get_criterion
from moe_prune.scoring import all_criteria as all_criteria
from moe_prune.scoring.registry import Direction, evaluate
from moe_prune.scoring.selection import Budget, Selection, group_quota
from moe_prune.scoring.stability import (
    DEFAULT_DRAWS,
    Stability,
    agreement,
    expert_stability,
    pair_stability,
    stability_note,
)
from moe_prune.scoring.stability import LayerStability as LayerStability


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
    stability: Stability | None = None

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
                    **(self.stability.layer_dict(layer) if self.stability else {}),
                }
                for layer, ids in self.original_ids.items()
            },
            "stability": self.stability.to_dict() if self.stability else None,
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
    stability: Sequence[str | Path] = (),
    draws: int = DEFAULT_DRAWS,
    draw_progress: Callable[[int, int], None] | None = None,
) -> tuple[DropMask, ScoreReport]:
    """Score experts with `criterion` and drop per `budget` (per layer, or over all layers with `global_`).

    `stats` is a Stats object or a path (or None for weight criteria); `model` a checkpoint folder or hub id
    (needed by weight criteria; with statistics it must be the same model). `progress(done, total)` reports
    MoE layers read by weight criteria. `stability` names disjoint partial statistics files (the parts
    `profile --combine` adds): `draws` bootstrap resamples of them (seeded by `seed`) give each layer's agreement.
    """
    crit = get_criterion(criterion)
    direction = direction or crit.direction
    if direction not in ("min", "max"):
        raise MoePruneError(f"--direction must be min or max, not {direction!r}")
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
    counts = [identity.experts_in(layer) for layer in identity.moe_layers]  # differ in a ragged model
    protected = _super_experts(stats, stats_name, counts) if protect_super_experts else set()
    n_group = _n_group(stats, ckpt, identity)
    rule = _selection(identity, direction, budget or Budget(drop=0), global_, min_keep, top_k, n_group, protected)
    parts = _load_parts(crit, stats, stats_name, stability, draws, warnings)

    weights = ExpertWeights(ckpt, progress) if crit.weights and ckpt else None
    inputs = Inputs(identity, stats, weights, seed, _vocab(stats, ckpt))
    scores, usage, values = evaluate(crit, inputs)
    drops, slot_pairs = rule.drops(scores, usage, values)
    stable = _stability(crit, inputs, rule, (scores, usage, values), (drops, slot_pairs), parts, draws, draw_progress)
    if parts:
        stable.parts, stable.draws, stable.seed = [str(p) for p in stability], draws, seed
    warnings += stable.warnings(crit.name)

    ids = identity.original_ids
    dropped = {layer: [ids[layer][slot] for slot in drops[i]] for i, layer in enumerate(identity.moe_layers)}
    pairs = {
        layer: [(ids[layer][p], ids[layer][q], v) for p, q, v in slot_pairs[i]]
        for i, layer in enumerate(identity.moe_layers)
        if values is not None
    }
    keep = {layer: [i for i in ids[layer] if i not in set(d)] for layer, d in dropped.items()}
    params: dict[str, Any] = {
        "direction": direction,
        **(budget or Budget(drop=0)).to_dict(),
        "global": global_,
        "min_keep": rule.floor if global_ else None,
        "seed": seed if crit.name == "random" else None,
        "protected_super_experts": sorted(ids[identity.moe_layers[i]][s] for i, s in protected)
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
        original_ids=dict(sorted(ids.items())),
        scores={layer: [float(s) for s in shown[i][: counts[i]]] for i, layer in enumerate(identity.moe_layers)},
        dropped=dropped,
        pairs=pairs,
        params=params,
        warnings=warnings,
        stability=stable,
    )
    return mask, report


def _selection(
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


def _stability(
    crit: Criterion,
    inputs: Inputs,
    rule: Selection,
    evaluated: tuple[np.ndarray, np.ndarray | None, np.ndarray | None],
    chosen: tuple[list[list[int]], list[list[tuple[int, int, float]]]],
    parts: list[Stats],
    draws: int,
    progress: Callable[[int, int], None] | None,
) -> Stability:
    """Per layer: ties and the margin at the cut; with `parts`, agreement under the bootstrap (seeded by `inputs`)."""
    (scores, usage, values), (drops, pairs) = evaluated, chosen
    if values is not None:
        assert usage is not None
        layers = pair_stability(values, usage, rule, pairs)
    else:
        real = [row[:n] for row, n in zip(scores, rule.counts, strict=True)]
        layers = expert_stability(real, drops, rule.direction, rule.n_drops is None)
    result = Stability(dict(zip(rule.layers, layers, strict=True)), note=stability_note(crit, parts))
    if parts:
        agreement(result, crit, inputs, rule, drops, parts, draws, inputs.seed, progress)
    return result


def _load_parts(
    crit: Criterion,
    stats: Stats | None,
    stats_name: str,
    paths: Sequence[str | Path],
    draws: int,
    warnings: list[str],
) -> list[Stats]:
    """The `--stability` parts: disjoint profiles of the same model holding what the criterion reads."""
    if draws < 1:
        raise MoePruneError(f"--draws must be at least 1 (got {draws})")
    if not paths or not crit.stats:
        return []  # a criterion of weights or a seed alone does not depend on the calibration data
    from moe_prune.stages.profile import refuse_overlap  # loads torch/transformers: only when asked

    assert stats is not None
    final = [name for name in crit.stats if STAT_FIELDS[name][0] == "final"]
    if final:
        raise MoePruneError(
            f"--stability: criterion {crit.name!r} reads {', '.join(final)}, reductions of one run's whole "
            "gradient that do not add across parts; only criteria of forward statistics can be resampled"
        )
    if len(paths) < 2:
        raise MoePruneError(
            "--stability needs at least two partial statistics files of disjoint data "
            "(e.g. `moe-prune profile --shard 0/4` ... `--shard 3/4`)"
        )
    loaded = [Stats.load(Path(p)) for p in paths]
    for path, part in zip(paths, loaded, strict=True):
        part.identity.require_same(stats.identity, str(path), stats_name)
        part.require(*crit.stats, source=str(path))
    refuse_overlap([Path(p) for p in paths], loaded)
    if "tokens" in stats.arrays and all("tokens" in part.arrays for part in loaded):
        parts_tokens = int(sum(part.arrays["tokens"] for part in loaded).max())
        if parts_tokens != int(stats.arrays["tokens"].max()):
            warnings.append(
                f"--stability: the parts hold {parts_tokens:,} tokens per MoE layer, {stats_name} "
                f"{int(stats.arrays['tokens'].max()):,}; the agreement is that of a selection from the parts' data"
            )
    return loaded


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


def _global_criteria() -> list[Criterion]:
    from moe_prune.scoring import all_criteria

    return [c for c in all_criteria() if c.global_ok]
