"""How far a selection can be trusted: ties, the margin at the cut, agreement under a bootstrap of partial profiles.

A drop chosen among nearly equal scores is decided by expert index (selection's tie rule), not by the data.
The margin says how far the cut is from flipping, relative to the layer's spread of scores. The bootstrap
resamples disjoint partial statistics (the files `profile --combine` adds) with replacement, recomputes the
criterion from the resampled sums and counts how often each layer keeps the same experts: would other
calibration data of the same size change this mask? Only statistics that combine exactly (sum, or, max)
resample; weight-only and seeded criteria do not depend on data, so they are stable by construction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from moe_prune.artifacts.stats import STAT_FIELDS, Stats
from moe_prune.scoring.registry import Criterion, Direction, Inputs, evaluate
from moe_prune.scoring.selection import Selection, pick_by_pairs

TIE_RTOL = 1e-5  # scores closer than this times the layer's largest |score| are equal (float32 running sums)
UNSTABLE_BELOW = 0.9  # bootstrap agreement under which the report asks for more calibration data
DEFAULT_DRAWS = 200

Arrays = dict[str, np.ndarray]


@dataclass
class LayerStability:
    """One MoE layer: margin at the cut (None: nothing dropped or nothing kept), tie flags, bootstrap results."""

    margin: float | None  # (first kept - last dropped) in the drop direction / the layer's score spread
    constant: bool  # every score within TIE_RTOL of the others: any cut is a tie broken by index
    tie: bool  # the last dropped and the first kept score are equal (within TIE_RTOL)
    agreement: float | None = None  # fraction of bootstrap draws that keep exactly the same experts
    jaccard: float | None = None  # mean Jaccard index of the kept sets (draw vs full data)

    @property
    def unstable(self) -> bool:
        """Agreement below UNSTABLE_BELOW: profile more calibration data before trusting this layer's mask."""
        return self.agreement is not None and self.agreement < UNSTABLE_BELOW


@dataclass
class Stability:
    """Per-layer stability of one `score` run, and how the bootstrap (if any) was drawn."""

    layers: dict[int, LayerStability]
    parts: list[str] = field(default_factory=list)
    draws: int = 0
    seed: int | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"parts": self.parts, "draws": self.draws, "seed": self.seed, "note": self.note}

    def layer_dict(self, layer: int) -> dict[str, Any]:
        return asdict(self.layers[layer])

    def warnings(self, criterion: str) -> list[str]:
        """Near-constant layers, ties at the cut, and a hint per layer whose agreement is low."""
        constant = [layer for layer, s in self.layers.items() if s.constant]
        ties = [layer for layer, s in self.layers.items() if s.tie]
        messages = []
        if constant:
            messages.append(
                f"criterion {criterion!r}: scores are nearly constant (spread within {TIE_RTOL:g} of the largest) "
                f"in layer{'s' if len(constant) > 1 else ''} {', '.join(map(str, constant))}; "
                "which experts go there is decided by expert index, not by the data"
            )
        if ties:
            messages.append(
                f"criterion {criterion!r}: the last dropped and the first kept expert score the same in "
                f"layer{'s' if len(ties) > 1 else ''} {', '.join(map(str, ties))}; that cut is decided by expert index"
            )
        for layer, s in self.layers.items():
            if s.unstable:
                messages.append(f"layer {layer}: selection unstable (agreement {s.agreement:.0%}); profile more data")
        return messages


def expert_stability(
    scores: list[np.ndarray], dropped: list[list[int]], direction: Direction, global_: bool
) -> list[LayerStability]:
    """Per layer, from its real experts' `scores` and dropped slots. Per layer the cut is the layer's own;
    with `--global` it is the last expert dropped anywhere, and the spread is that of all layers."""
    keys = [np.asarray(s, dtype=np.float64) * (1 if direction == "min" else -1) for s in scores]
    every = np.concatenate(keys)
    last_global = max((float(k[d].max()) for k, d in zip(keys, dropped, strict=True) if d), default=None)
    result = []
    for key, drops in zip(keys, dropped, strict=True):
        kept = np.setdiff1d(np.arange(len(key)), drops)
        scale = float(np.abs(key).max())
        constant = _spread(key) <= TIE_RTOL * scale
        last = last_global if global_ else (float(key[drops].max()) if drops else None)
        if last is None or not len(kept):
            result.append(LayerStability(None, constant, False))
            continue
        gap = float(key[kept].min()) - last
        spread = _spread(every) if global_ else _spread(key)
        tie = not constant and abs(gap) <= TIE_RTOL * (float(np.abs(every).max()) if global_ else scale)
        result.append(LayerStability(gap / spread if spread > 0 else 0.0, constant, tie))
    return result


def pair_stability(
    values: np.ndarray, usage: np.ndarray, selection: Selection, pairs: list[list[tuple[int, int, float]]]
) -> list[LayerStability]:
    """Pair criteria: the cut is between the last pair chosen and the pair the greedy rule would choose next
    (same quotas); the spread is over the layer's distinct pairs."""
    assert selection.n_drops is not None  # pair criteria are never --global
    result = []
    for index, (n, chosen) in enumerate(zip(selection.counts, pairs, strict=True)):
        layer_values = values[index][:n, :n]
        real = layer_values[np.triu_indices(n, k=1)]
        scale = float(np.abs(real).max()) if real.size else 0.0
        constant = _spread(real) <= TIE_RTOL * scale
        _, more_pairs = pick_by_pairs(
            layer_values, usage[index][:n], selection.direction, len(chosen) + 1, selection.allowed(index)
        )
        if not chosen or len(more_pairs) <= len(chosen):
            result.append(LayerStability(None, constant, False))
            continue
        gap = more_pairs[-1][2] - chosen[-1][2]
        gap = gap if selection.direction == "min" else -gap
        spread = _spread(real)
        tie = not constant and abs(gap) <= TIE_RTOL * scale
        result.append(LayerStability(gap / spread if spread > 0 else 0.0, constant, tie))
    return result


def _spread(values: np.ndarray) -> float:
    return float(values.max() - values.min()) if values.size else 0.0


def resample(parts: list[Arrays], picks: np.ndarray, fields: tuple[str, ...]) -> Arrays:
    """The statistics of a multiset of parts (`picks[i]` copies of part i), combined by each field's rule:
    sums weighted by the copies, bitsets ORed and maxima taken over the parts drawn at least once."""
    drawn = [part for part, count in zip(parts, picks, strict=True) if count > 0]
    out: Arrays = {}
    for name in fields:
        rule = STAT_FIELDS[name][0]
        assert rule != "final", name  # refused before drawing
        if rule == "sum":
            out[name] = sum(int(count) * part[name] for part, count in zip(parts, picks, strict=True) if count > 0)
        elif rule == "or":
            out[name] = np.bitwise_or.reduce([part[name] for part in drawn])
        else:
            out[name] = np.maximum.reduce([part[name] for part in drawn])
    return out


def bootstrap(
    parts: list[Arrays],
    fields: tuple[str, ...],
    choose: Callable[[Arrays], list[set[int]]],
    reference: list[set[int]],
    draws: int,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(agreement [L], mean Jaccard [L]) of the kept sets over `draws` resamples of the parts (with replacement,
    as many parts as given, `numpy.random.default_rng(seed)`), against the full data's kept sets `reference`."""
    rng = np.random.default_rng(seed)
    same = np.zeros(len(reference))
    jaccard = np.zeros(len(reference))
    for draw in range(draws):
        picks = np.bincount(rng.integers(0, len(parts), size=len(parts)), minlength=len(parts))
        kept = choose(resample(parts, picks, fields))
        for index, (got, want) in enumerate(zip(kept, reference, strict=True)):
            same[index] += got == want
            jaccard[index] += len(got & want) / len(got | want) if got | want else 1.0
        if progress:
            progress(draw + 1, draws)
    return same / max(draws, 1), jaccard / max(draws, 1)


def stability_note(crit: Criterion, parts: list[Stats]) -> str:
    """What the stability columns can say for this criterion and these inputs."""
    if not crit.stats:
        return "scores do not depend on calibration data (weights or a seed only): stable by construction"
    if not parts:
        return "margin only; --stability PART.npz (two or more disjoint partial profiles) adds bootstrap agreement"
    return f"bootstrap over {len(parts)} disjoint partial profiles"


def agreement(
    result: Stability,
    crit: Criterion,
    inputs: Inputs,
    selection: Selection,
    drops: list[list[int]],
    parts: list[Stats],
    draws: int,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Fill each layer's agreement and Jaccard: the criterion and `selection` rerun on resampled `parts`
    (protected experts and quotas as in the full run), compared with the full data's `drops`."""
    assert inputs.stats is not None
    counts = selection.counts

    def kept(chosen: list[list[int]]) -> list[set[int]]:
        return [set(range(n)) - set(d) for n, d in zip(counts, chosen, strict=True)]

    def choose(arrays: Arrays) -> list[set[int]]:
        assert inputs.stats is not None
        sample = replace(inputs, stats=Stats(inputs.identity, arrays, inputs.stats.provenance), weights=None)
        return kept(selection.drops(*evaluate(crit, sample))[0])

    same, jaccard = bootstrap([p.arrays for p in parts], crit.stats, choose, kept(drops), draws, seed, progress)
    for index, layer in enumerate(selection.layers):
        result.layers[layer].agreement = float(same[index])
        result.layers[layer].jaccard = float(jaccard[index])
