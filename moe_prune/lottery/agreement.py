"""Which original experts two methods dropped, and how much they agree (MC-Suite figure 5).

Per MoE layer, for two methods' dropped sets A and B of the same original experts:
both drop = |A ∩ B|, disagree = |A △ B|, both keep = E - |A ∪ B|, Jaccard = |A ∩ B| / |A ∪ B|
(1 when both dropped nothing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moe_prune.errors import MoePruneError
from moe_prune.plotting import pyplot, save_figure

# The comparisons of figure 5: (a) one-shot vs lottery, (b) iterative vs lottery; plus one-shot vs iterative.
PAIRS = (("one-shot", "lottery"), ("iterative", "lottery"), ("one-shot", "iterative"))
BOTH_DROP, DISAGREE, BOTH_KEEP = 0, 1, 2
COLORS = {BOTH_DROP: "#ffe4c4", DISAGREE: "#b03060", BOTH_KEEP: "#000000"}  # bisque, dark pink, black (figure 5)
LABELS = {BOTH_DROP: "both drop", DISAGREE: "disagree", BOTH_KEEP: "both keep"}

Dropped = dict[int, list[int]]  # MoE layer -> dropped original expert ids


@dataclass
class LayerAgreement:
    """Agreement of two methods in one MoE layer."""

    first: str
    second: str
    layer: int
    both_drop: int
    disagree: int
    both_keep: int
    jaccard: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(first: str, a: Dropped, second: str, b: Dropped, experts: dict[int, list[int]]) -> list[LayerAgreement]:
    """Per layer agreement of the dropped sets `a` and `b` among each layer's original `experts`."""
    rows = []
    for layer, ids in sorted(experts.items()):
        sa, sb = set(a[layer]), set(b[layer])
        union = sa | sb
        jaccard = len(sa & sb) / len(union) if union else 1.0
        rows.append(LayerAgreement(first, second, layer, len(sa & sb), len(sa ^ sb), len(ids) - len(union), jaccard))
    return rows


def all_pairs(dropped: dict[str, Dropped], experts: dict[int, list[int]]) -> list[LayerAgreement]:
    """Every pair of `PAIRS` whose two methods were run."""
    return [
        row for x, y in PAIRS if x in dropped and y in dropped for row in compare(x, dropped[x], y, dropped[y], experts)
    ]


def cell(expert: int, a: list[int], b: list[int]) -> int:
    """Figure 5's colour class of one expert."""
    return BOTH_DROP if expert in a and expert in b else DISAGREE if (expert in a) != (expert in b) else BOTH_KEEP


def plot(
    dropped: dict[str, Dropped],
    experts: dict[int, list[int]],
    path: Path,
    force: bool = False,
    inputs: tuple[str | Path, ...] = (),
) -> None:
    """One panel per compared pair, layers x original experts coloured as in figure 5; or, for a single
    method, which experts it dropped."""
    plt = pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    pairs = [(x, y) for x, y in PAIRS if x in dropped and y in dropped]
    if not pairs:
        if len(dropped) != 1:
            raise MoePruneError("--plot: nothing to draw")
        only = next(iter(dropped))
        pairs = [(only, only)]  # one method against itself: dropped vs kept
    layers = sorted(experts)
    width = max(len(ids) for ids in experts.values())
    cmap = ListedColormap([COLORS[BOTH_DROP], COLORS[DISAGREE], COLORS[BOTH_KEEP]])
    fig, axes = plt.subplots(
        1, len(pairs), figsize=(0.4 * width * len(pairs) + 2, 0.4 * len(layers) + 1.6), squeeze=False
    )
    for ax, (x, y) in zip(axes.flat, pairs, strict=True):
        grid = [[cell(e, dropped[x][layer], dropped[y][layer]) for e in experts[layer]] for layer in layers]
        ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=2.5, aspect="equal")
        ax.set_title(f"{x} vs {y}" if x != y else f"{x}: dropped experts", fontsize=9)
        ax.set_xlabel("original expert")
        ax.set_ylabel("MoE layer")
        ax.set_xticks(range(width))
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    shown = (BOTH_DROP, DISAGREE, BOTH_KEEP) if pairs[0][0] != pairs[0][1] else (BOTH_DROP, BOTH_KEEP)
    names = LABELS if pairs[0][0] != pairs[0][1] else {BOTH_DROP: "dropped", BOTH_KEEP: "kept"}
    handles = [Patch(facecolor=COLORS[k], edgecolor="grey", label=names[k]) for k in shown]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    save_figure(fig, path, force, inputs)
