"""matplotlib, loaded only when a command is asked for a `--plot`: an optional dependency."""

from __future__ import annotations

from typing import Any

from moe_prune.errors import MoePruneError


def pyplot() -> Any:
    """`matplotlib.pyplot` on the file-only Agg backend, or a one-line error saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise MoePruneError("--plot needs matplotlib: pip install 'moe-prune[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
