"""How `merge` merges and writes: `stages.merge.run`'s spec and `moe-prune merge`'s options (the model,
statistics, --keep and output folder are the command's own)."""

from __future__ import annotations

from dataclasses import dataclass

from moe_prune.specs import parse
from moe_prune.specs.fields import like, option
from moe_prune.specs.groups import Output
from moe_prune.specs.profile import ProfileSpec

REFIT_HELP = (
    "Fit each slot's down projection to the layer's output: from profile --refit-stats sums, else in "
    "one layer-by-layer pass over the statistics' calibration windows."
)
RIDGE_HELP = (
    "Relative ridge of --refit's least squares (default: a fixed one, shown in the refit table), or "
    "auto: chosen per slot on held-out calibration windows (layer-by-layer pass only)."
)

EXPERT_MEMORY_HELP = (
    "Layer-by-layer refit: bytes of a layer's experts loaded at once, e.g. 4GB; a layer whose experts are "
    "larger runs them a chunk at a time and reads each slot's expert alone, again for every batch."
)
REFIT_MEMORY_HELP = (
    "Layer-by-layer refit: float64 sums kept at once, e.g. 8GB (at least one slot's); a layer's slots "
    "are summed in groups that fit, the layer run once per group (default: half the layer's own bytes, "
    "within half the available memory)."
)


@dataclass(frozen=True)
class MergeSpec(Output):
    """Merge's options: the method, how merged experts are built, the refit pass, the output."""

    method: str = option("uncurl", "uncurl (router-logit clustering), hcsmoe (output clustering), frequency or prune.")
    router: str = option("anchor", "Router rows of merged experts: anchor, average or reinit (then train the router).")
    weights: str = option(
        "frequency", "Average members in proportion to: frequency (selections) or output (gate x norm)."
    )
    refit: bool = option(False, REFIT_HELP, "--refit")
    refit_ridge: str | None = option(None, RIDGE_HELP)
    device: str | None = option(  # None: not given (the stage refuses --device without the layer-by-layer pass)
        None, "cpu, cuda, cuda:1, ... or auto (spread over GPUs) (default: cpu).", affects_result=False
    )
    buffer_memory: int | None = like(ProfileSpec, "buffer_memory")
    refit_memory: int | None = option(  # bytes of refit sums alive at once; the slots run in groups (refit_groups)
        None, REFIT_MEMORY_HELP, cli_type=str | None, parse=parse.size_or_none, affects_result=False
    )
    expert_memory: int | None = like(ProfileSpec, "expert_memory", help=EXPERT_MEMORY_HELP)
    skip_layers: list[int] | None = option(
        None,
        "MoE layers to leave as they are (e.g. 0 or 0,5).",
        "--skip-layers",
        cli_type=list[str] | None,
        parse=parse.layer_numbers,
    )
    seed: int = option(0, "Seed of k-means and of --router reinit.", min=0, max=parse.MAX_SEED)
