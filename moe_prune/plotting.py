"""matplotlib, loaded only when a command is asked for a `--plot`: an optional dependency.

A picture is an output like any other: checked before the work (a .png name, not an existing file
without --force, never an input) and written through the one atomic file writer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moe_prune.errors import MoePruneError
from moe_prune.io.output import atomic_file, check_not_input, check_writable


def pyplot() -> Any:
    """`matplotlib.pyplot` on the file-only Agg backend, or a one-line error saying how to install it."""
    try:
        import matplotlib
    except ImportError as exc:
        raise MoePruneError("--plot needs matplotlib: pip install 'moe-prune[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_plot(path: Path | None, force: bool, inputs: tuple[str | Path, ...] = ()) -> None:
    """Refuse a bad `--plot` before any work: not .png, existing without --force, or an input."""
    if path is None:
        return
    if Path(path).suffix.lower() != ".png":
        raise MoePruneError(f"--plot {path}: give a .png file name")
    check_writable(Path(path), force, "file")
    check_not_input(Path(path), inputs)


def save_figure(fig: Any, path: Path, force: bool, inputs: tuple[str | Path, ...] = ()) -> None:
    """Write `fig` as PNG to `path` atomically (temporary file, then rename) and close it."""
    try:
        with atomic_file(Path(path), force, protect=tuple(Path(p) for p in inputs)) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        pyplot().close(fig)
