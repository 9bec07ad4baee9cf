"""What `score` selects: `stages.score.score`'s options and `moe-prune score`'s (the statistics, model, output
and the --list / --explain modes are the command's own); the budget is one of drop, keep or ratio."""

from __future__ import annotations

from dataclasses import dataclass

from moe_prune.specs import parse
from moe_prune.specs.fields import option

PROTECT_HELP = (
    "Never drop REAP's super experts: largest |output| above the 99.5th percentile of all experts and "
    "a tenth of the largest, in the first 75% of MoE layers."
)
STABILITY_HELP = (
    "A partial statistics file of disjoint data (repeat: the files `profile --combine` adds, e.g. "
    "`--shard 0/4` ... `3/4`); each layer's selection is recomputed on bootstrap resamples of them."
)


@dataclass(frozen=True)
class ScoreSpec:
    """The criterion, its direction, the budget and how the selection is made and checked."""

    criterion: str | None = option(None, "Criterion name (see --list).", "--criterion", "-c")  # None: refused
    direction: str | None = option(None, "min drops the lowest scores first, max the highest (default: per criterion).")
    drop: int | None = option(None, "Experts to drop per layer (in total with --global).")
    keep: int | None = option(None, "Experts to keep per layer (in total with --global).")
    ratio: float | None = option(None, "Fraction of experts to drop, rounded to nearest.")
    global_: bool = option(False, "Choose across all layers (non-uniform; comparable criteria only).", "--global")
    min_keep: int | None = option(None, "With --global: fewest experts a layer keeps (default and minimum: top-k).")
    seed: int = option(0, "Seed of the `random` criterion and of the --stability bootstrap.", min=0, max=parse.MAX_SEED)
    protect_super_experts: bool = option(False, PROTECT_HELP, "--protect-super-experts")
    stability: tuple[str, ...] = option(
        (), STABILITY_HELP, "--stability", cli_type=list[str] | None, cli_default=None, parse=parse.as_tuple
    )
    draws: int = option(200, "Bootstrap resamples of the --stability files.")

    @property
    def budget_given(self) -> bool:
        """One of --drop, --keep, --ratio was given (`scoring.selection.Budget` checks it is exactly one)."""
        return (self.drop, self.keep, self.ratio) != (None, None, None)
