"""What a sweep runs and how each model is evaluated: `stages.sweep.run`'s settings and `moe-prune sweep`'s
options; the evaluation, task and model-loading options are eval's groups, reused (`specs.groups`)."""

from __future__ import annotations

from dataclasses import dataclass

from moe_prune.specs import parse
from moe_prune.specs.fields import option
from moe_prune.specs.groups import Heldout, ModelLoading, Tasks

SCOPES_HELP = (
    "Scopes, comma-separated: layer (each layer drops the ratio), global (where comparable), search "
    "(per-layer counts searched by `allocate`); both = layer,global; all = the three."
)


@dataclass(frozen=True)
class SweepSpec(ModelLoading, Tasks, Heldout):
    """What to sweep and how each model is evaluated (see `moe-prune sweep --help` for each field)."""

    criteria: tuple[str, ...] = option(  # empty: every registered criterion but `random` (the floor)
        (),
        "Comma-separated criteria, or all (see `moe-prune score --list`).",
        "--criteria",
        "-c",
        cli_type=str,
        cli_default="all",
        parse=parse.all_or_names,
    )
    ratios: tuple[float, ...] = option(
        (0.25, 0.5),
        "Comma-separated fractions of experts to drop, each in (0, 1).",
        cli_type=str,
        cli_default="0.25,0.5",
        parse=parse.ratios,
    )
    directions: str = option(  # default | opposite | both
        "default", "default (the papers'), opposite, or both (the sweep says which one holds)."
    )
    scopes: str = option("layer", SCOPES_HELP, "--global")  # layer | global | search, comma-separated; both; all
    merge_methods: tuple[str, ...] = option(  # ("all",): every registered merge method
        (),
        "Comma-separated merge methods (see `moe-prune merge --help`), or all.",
        cli_type=str | None,
        cli_default=None,
        parse=parse.name_tuple,
    )
    merge_weights: tuple[str, ...] = option(  # what merges average members by (each a line)
        ("frequency",),
        "Merges average members by: frequency, output, or both comma-separated.",
        cli_type=str,
        cli_default="frequency",
        parse=parse.name_tuple,
    )
    merge_refit: str = option(  # no | yes | both
        "no", "Merges with refit down projections: no, yes or both (needs refit sums or a pass)."
    )
    search_evals: int = option(32, "With --global search: candidates each allocation search evaluates.")
    random_seeds: int = option(5, "Random masks per ratio; the best of them (lowest perplexity) is the floor.")
    prune_hopeless: bool = option(
        False, "Stop a line at larger ratios once it is worse than random at a smaller one.", "--prune-hopeless"
    )
    merge_seed: int = option(0, "Seed of the merge methods (k-means).", "--seed", min=0, max=parse.MAX_SEED)
