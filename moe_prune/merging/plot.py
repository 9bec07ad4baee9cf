"""Heatmaps of the expert-similarity matrix per layer, rows and columns ordered by cluster."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from moe_prune.errors import MoePruneError
from moe_prune.plotting import pyplot, save_figure


def similarity_heatmaps(
    layers: list[Any], path: Path, force: bool = False, inputs: tuple[str | Path, ...] = ()
) -> None:
    """One panel per merged layer (`LayerReport`s with similarity and order); cluster borders drawn."""
    plt = pyplot()

    shown = [r for r in layers if r.similarity is not None]
    if not shown:
        raise MoePruneError("--plot: no merged layer to draw (every layer was skipped)")
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(shown) :]:
        ax.axis("off")
    for ax, report in zip(axes.flat, shown, strict=False):
        order = report.order
        matrix = report.similarity[order][:, order]
        image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
        edge = -0.5
        for cluster in report.clusters:
            edge += len(cluster.members)
            ax.axhline(edge, color="white", linewidth=0.8)
            ax.axvline(edge, color="white", linewidth=0.8)
        ax.set_title(f"layer {report.layer}: {report.experts_before} → {report.experts_after}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=list(axes.flat), shrink=0.8, label="S = (1 + cos) / 2")
    save_figure(fig, path, force, inputs)
