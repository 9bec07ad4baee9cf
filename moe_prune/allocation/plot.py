"""The `--plot` of `allocate`: experts kept per MoE layer by the uniform, global and searched allocations."""

from __future__ import annotations

from typing import Any

from moe_prune.plotting import pyplot


def counts_figure(report: Any) -> Any:
    """Grouped bars, one group per MoE layer; `report` is an `AllocationReport`."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.4 * len(report.layers) + 3), 3.5))
    names = list(report.counts)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [x + (i - (len(names) - 1) / 2) * width for x in range(len(report.layers))]
        ax.bar(
            xs,
            report.counts[name],
            width,
            label=f"{name} ({report.objective} {report.values[name][report.objective]:.3f})",
        )
    ax.set_xticks(range(len(report.layers)), [str(n) for n in report.layers])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("experts kept")
    ax.set_title(f"allocate: {report.criterion}")
    ax.legend()
    fig.tight_layout()
    return fig
