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
from moe_prune.artifacts.stats import Stats
from moe_prune.checkpoint.expert_weights import ExpertWeights
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.errors import MoePruneError
from moe_prune.io.output import atomic_file
from moe_prune.scoring import Criterion, Inputs, get_criterion
from moe_prune.scoring import all_criteria as all_criteria
from moe_prune.scoring.registry import Direction, evaluate
from moe_prune.scoring.selection import Budget
from moe_prune.scoring.stability import (
    DEFAULT_DRAWS,
    Stability,
)
from moe_prune.scoring.stability import LayerStability as LayerStability
from moe_prune.specs.score import ScoreSpec
from moe_prune.stages.score_selection import selection_rule, super_experts
from moe_prune.stages.score_stability import load_parts, stability_of


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
    drop, keep, ratio = (budget.drop, budget.keep, budget.ratio) if budget is not None else (None, None, None)
    spec = ScoreSpec(
        criterion, direction, drop, keep, ratio, global_, min_keep, seed, protect_super_experts,
        tuple(str(p) for p in stability), draws,
    )  # fmt: skip
    return score_spec(stats, model, spec, progress, draw_progress, stats_name)


def score_spec(
    stats: Stats | str | Path | None,
    model: str | Path | None,
    spec: ScoreSpec,
    progress: Callable[[int, int], None] | None = None,
    draw_progress: Callable[[int, int], None] | None = None,
    stats_name: str | None = None,
) -> tuple[DropMask, ScoreReport]:
    """`score` with its options as one spec (`moe-prune score`'s, see `score`)."""
    if spec.criterion is None:
        raise MoePruneError("pass --criterion NAME (see `moe-prune score --list`)")
    crit = get_criterion(spec.criterion)
    direction = _direction(crit, spec.direction, spec.global_)  # type: ignore[arg-type]
    global_, seed, draws = spec.global_, spec.seed, spec.draws
    budget = Budget(spec.drop, spec.keep, spec.ratio) if spec.budget_given else Budget(drop=0)
    stats, stats_name = _load(stats, stats_name)
    ckpt = Checkpoint.open(model) if model is not None else None
    identity = _identity(crit, stats, ckpt, stats_name)
    warnings: list[str] = []
    top_k = _top_k(stats, ckpt, warnings)
    counts = [identity.experts_in(layer) for layer in identity.moe_layers]  # differ in a ragged model
    protected = super_experts(stats, stats_name, counts) if spec.protect_super_experts else set()
    n_group = _n_group(stats, ckpt, identity)
    rule = selection_rule(identity, direction, budget, global_, spec.min_keep, top_k, n_group, protected)
    parts = load_parts(crit, stats, stats_name, spec.stability, draws, warnings)
    weights = ExpertWeights(ckpt, progress) if crit.weights and ckpt else None
    inputs = Inputs(identity, stats, weights, seed, _vocab(stats, ckpt))
    scores, usage, values = evaluate(crit, inputs)
    drops, slot_pairs = rule.drops(scores, usage, values)
    stable = stability_of(crit, inputs, rule, (scores, usage, values), (drops, slot_pairs), parts, draws, draw_progress)
    if parts:
        stable.parts, stable.draws, stable.seed = [str(p) for p in spec.stability], draws, seed
    warnings += stable.warnings(crit.name)
    ids = identity.original_ids
    dropped, pairs = _original_ids(identity, drops, slot_pairs if values is not None else None)
    keep = {layer: [i for i in ids[layer] if i not in set(d)] for layer, d in dropped.items()}
    protected_ids = sorted(ids[identity.moe_layers[i]][s] for i, s in protected) if spec.protect_super_experts else None
    params = {"direction": direction, **budget.to_dict(), "global": global_}
    params |= _recorded(rule.floor if global_ else None, seed if crit.name == "random" else None, protected_ids)
    params |= {"top_k": top_k, "stats": stats_name if stats is not None else None}
    params["model"] = str(model) if model is not None else None
    mask = DropMask.create(identity, keep, crit.name, params)
    mask.validate_groups(n_group, "mask")
    shown = usage if values is not None else scores
    per_layer = {layer: [float(s) for s in shown[i][: counts[i]]] for i, layer in enumerate(identity.moe_layers)}
    ids_sorted = dict(sorted(ids.items()))
    report = ScoreReport(crit.name, direction, crit.kind, crit.source, ids_sorted, per_layer, dropped, pairs)
    report.params, report.warnings, report.stability = params, warnings, stable
    return mask, report


def _recorded(min_keep: int | None, seed: int | None, protected: list[int] | None) -> dict[str, Any]:
    """The mask's params that are set only when they acted: --global's floor, `random`'s seed, super experts."""
    return {"min_keep": min_keep, "seed": seed, "protected_super_experts": protected}


def _load(stats: Stats | str | Path | None, stats_name: str | None) -> tuple[Stats | None, str]:
    """The statistics (read when given as a path) and the name messages call them by."""
    if isinstance(stats, (str, Path)):
        return Stats.load(Path(stats)), stats_name or str(stats)
    return stats, stats_name or "stats"


def _direction(crit: Criterion, direction: Direction | None, global_: bool) -> Direction:
    """The criterion's own direction unless given; --global only for scores comparable across layers."""
    direction = direction or crit.direction
    if direction not in ("min", "max"):
        raise MoePruneError(f"--direction must be min or max, not {direction!r}")
    if global_ and not crit.global_ok:
        comparable = ", ".join(c.name for c in _global_criteria())
        raise MoePruneError(
            f"criterion {crit.name!r} gives scores that are not comparable across layers, so --global is "
            f"refused; criteria that support it: {comparable}"
        )
    return direction


def _original_ids(
    identity: ModelIdentity, drops: list[list[int]], slot_pairs: list[list[tuple[int, int, float]]] | None
) -> tuple[dict[int, list[int]], dict[int, list[tuple[int, int, float]]]]:
    """Dropped experts (in the order chosen) and merged pairs per MoE layer, slots turned into original ids."""
    ids = identity.original_ids
    dropped = {layer: [ids[layer][slot] for slot in drops[i]] for i, layer in enumerate(identity.moe_layers)}
    pairs = {
        layer: [(ids[layer][p], ids[layer][q], v) for p, q, v in slot_pairs[i]]
        for i, layer in enumerate(identity.moe_layers)
        if slot_pairs is not None
    }
    return dropped, pairs


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


def _vocab(stats: Stats | None, ckpt: Checkpoint | None) -> int | None:
    if ckpt is not None:
        vocab = ckpt.config.get("vocab_size")
        return vocab if isinstance(vocab, int) else None
    return stats.provenance.get("vocab_size") if stats is not None else None


def _global_criteria() -> list[Criterion]:
    from moe_prune.scoring import all_criteria

    return [c for c in all_criteria() if c.global_ok]
