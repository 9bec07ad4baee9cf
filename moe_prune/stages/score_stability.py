"""How stable `score`'s choice is: ties and margins at the cut, and agreement over bootstrap resamples of
disjoint partial statistics (`score --stability PART...`, the parts `profile --combine` adds)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from moe_prune.artifacts.stats import STAT_FIELDS, Stats
from moe_prune.errors import MoePruneError
from moe_prune.scoring import Criterion, Inputs
from moe_prune.scoring.selection import Selection
from moe_prune.scoring.stability import Stability, agreement, expert_stability, pair_stability, stability_note


def stability_of(
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


def load_parts(
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
