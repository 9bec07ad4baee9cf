"""`merge`'s checks of its statistics and refit options, before anything is read or written; also used by
`allocate --for merge` and `sweep`. Split from `stages.merge` (issue #22: files <= 300 lines)."""

from __future__ import annotations

from typing import Any

from moe_prune.artifacts.stats import Stats
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.errors import MoePruneError
from moe_prune.merging.registry import NEEDS, PRODUCED_BY, weight_statistic


def check_stats(stats: Stats, ckpt: Checkpoint, method: str, name: str, weights: str = "", refit: bool = False) -> None:
    """Statistics of this very model, holding everything the method, the weights and the refit read."""
    stats.identity.require_same(ckpt.identity, name, str(ckpt.folder))
    if "hard_counts" not in stats.arrays:
        raise MoePruneError(f"{name}: lacks expert selection counts (hard_counts); re-run `moe-prune profile`")
    wanted = [(stat, f"--method {method}") for stat in NEEDS.get(method, ())]
    if weights and method != "prune":
        wanted.append((weight_statistic(weights), f"--weights {weights}"))
    wanted += [(stat, "--refit") for stat in ("refit_hh", "refit_hy") if refit]
    for stat, option in wanted:
        if stat not in stats.arrays:
            hint = " (or use --method prune)" if stat == "logit_gram" else ""
            raise MoePruneError(
                f"{name}: lacks {stat}, which {option} needs; re-run `{PRODUCED_BY[stat]}`{hint}{stats.profiled_for()}"
            )


def check_refit_options(
    refit: bool, stored: bool, refit_ridge: str | float | None, passing: dict[str, Any], stats_name: str
) -> None:
    """Refit options only where they act: all with --refit; `passing` ({option: value or None}) and auto in the
    layer-by-layer pass only."""
    given = [option for option, value in {"--refit-ridge": refit_ridge, **passing}.items() if value is not None]
    if given and not refit:
        raise MoePruneError(f"{given[0]} applies to --refit only; add --refit or leave {given[0]} out")
    pass_only = [option for option, value in passing.items() if value is not None]
    if stored and (refit_ridge == "auto" or pass_only):
        option = "--refit-ridge auto" if refit_ridge == "auto" else pass_only[0]
        raise MoePruneError(
            f"{stats_name}: holds refit sums (profile --refit-stats), solved with a fixed ridge without running the "
            f"model, so {option} does not apply; give a --refit-ridge number, or use statistics without "
            "refit_hh/refit_hy (the layer-by-layer pass)"
        )
