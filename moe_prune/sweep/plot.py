"""`sweep --plot`: held-out perplexity against experts kept, one line per criterion line or merge method."""

from __future__ import annotations

from pathlib import Path

from moe_prune.errors import MoePruneError
from moe_prune.plotting import pyplot
from moe_prune.sweep.results import Row, SweepResult


def perplexity_plot(result: SweepResult, path: Path) -> None:
    """Each line starts at the original (all experts); the random floor is drawn as mean with its spread."""
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
    fig, ax = plt.subplots(figsize=(10, 6))
    for line, rows in sorted(lines.items()):
        points = sorted([*original, *((r.experts_kept, r.perplexity) for r in rows)])
        style = "--" if rows[0].combo.kind == "merge" else "-"
        ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", markersize=3, label=line)
    kept = {r.combo.ratio: r.experts_kept for r in result.rows if r.combo.kind == "random" and r.status == "done"}
    floor = [f for f in result.floors.values() if f.ratio in kept]
    if floor:
        ax.errorbar(
            [kept[f.ratio] for f in floor],
            [f.mean for f in floor],
            yerr=[[f.mean - f.low for f in floor], [f.high - f.mean for f in floor]],
            color="black",
            linewidth=2,
            capsize=4,
            label=f"random masks (mean, range of {floor[0].seeds})",
        )
    ax.set_yscale("log")
    ax.set_xlabel("experts kept per MoE layer (mean over layers)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title(f"{Path(result.model).name}: sweep of {len(lines)} lines", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise MoePruneError(f"{path}: cannot write the plot ({exc.strerror})") from None
    finally:
        plt.close(fig)
