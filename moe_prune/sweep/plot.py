"""`sweep --plot`: held-out perplexity against experts kept, one line per criterion line or merge method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moe_prune.errors import MoePruneError
from moe_prune.plotting import pyplot, save_figure
from moe_prune.sweep.results import Row, SweepResult

PLOT_NAME = "sweep.png"


def perplexity_plot(result: SweepResult, path: Path) -> None:
    """Each line starts at the original (all experts); the random floor is drawn as the best mask with its range.

    One colour per criterion or merge method; the papers' direction solid, the opposite dotted, merges dashed,
    global selection with square markers.
    """
    plt = pyplot()
    lines: dict[str, list[Row]] = {}
    for row in result.rows:
        if row.status == "done" and row.combo.kind in ("prune", "merge"):
            lines.setdefault(row.combo.line, []).append(row)
    if not lines:
        raise MoePruneError("--plot: no pruned or merged model was measured, nothing to draw")
    original = [
        (r.experts_kept, r.perplexity) for r in result.rows if r.combo.kind == "original" and r.status == "done"
    ]
    names = sorted({rows[0].combo.name for rows in lines.values()})
    colours = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(11, max(6.0, 0.17 * len(lines))))
    for line, rows in sorted(lines.items()):
        points = sorted([*original, *((r.experts_kept, r.perplexity) for r in rows)])
        ax.plot(*zip(*points, strict=True), label=line, **_style(rows[0], result.defaults, colours, names))
    _floor(ax, result)
    ax.set_yscale("log")
    ax.set_xlabel("experts kept per MoE layer (mean over layers)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title(f"{'/'.join(Path(result.model).parts[-2:])}: {len(lines)} lines", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    save_figure(fig, path, force=True)  # the sweep's own file, replaced like table.json


def _style(row: Row, defaults: dict[str, str], colours: Any, names: list[str]) -> dict[str, Any]:
    combo = row.combo
    dotted = combo.kind == "prune" and combo.direction != defaults.get(combo.name)
    return {
        "color": colours(names.index(combo.name) % 20),
        "linestyle": "--" if combo.kind == "merge" else ":" if dotted else "-",
        "marker": "s" if combo.scope == "global" else "o",
        "markersize": 3,
    }


def _floor(ax: Any, result: SweepResult) -> None:
    """The random masks: the best perplexity per ratio (the floor), with a bar up to the worst seed."""
    kept = {r.combo.ratio: r.experts_kept for r in result.rows if r.combo.kind == "random" and r.status == "done"}
    floor = [f for f in result.floors.values() if f.ratio in kept]
    if floor:
        ax.errorbar(
            [kept[f.ratio] for f in floor],
            [f.value for f in floor],
            yerr=[[0.0 for f in floor], [f.high - f.value for f in floor]],
            color="black",
            linewidth=2,
            capsize=4,
            label=f"random masks: the floor is the {floor[0].rule} (bar: up to the worst)",
        )
