"""What `allocate` searches and how candidates are judged: `moe-prune allocate`'s options (the model,
statistics, --data, output and plot are the command's own); model loading is the shared group's."""

from __future__ import annotations

from dataclasses import dataclass

from moe_prune.specs import parse
from moe_prune.specs.fields import like, option
from moe_prune.specs.groups import ModelLoading

CRITERION_HELP = (
    "Criterion ordering experts inside a layer (--for merge: ranks the global start; default "
    "soft-counts, or usage-frequency without soft_counts)."
)
BUDGET_EVALS_HELP = (
    "Candidates evaluated at most per search (starts included); --top-k search adds up to as many again "
    "(its exchange search) plus its greedy's (see README)."
)
TOP_K_HELP = "keep (the model's top-k) or search (per-layer top-k after the counts, LExI-style; see README)."


@dataclass(frozen=True)
class AllocateSpec:
    """The budget, what the counts are for, the search and the calibration the candidates are judged on."""

    criterion: str | None = option(None, CRITERION_HELP, "--criterion", "-c")
    ratio: float | None = option(None, "Fraction of the searched layers' experts to drop.")
    keep: int | None = option(None, "Experts to keep in the searched layers together.")
    bytes_: str | None = option(None, "Largest checkpoint size, e.g. 10MB, 5GiB (routed experts + rest).", "--bytes")
    for_: str = option("prune", "prune (a drop mask) or merge (counts for `merge`, judged as merged).", "--for")
    method: str | None = option(None, "With --for merge: the merge method (see `moe-prune merge --help`).")
    weights: str | None = option(None, "With --for merge: average members by frequency or output.")
    refit: bool = option(False, "With --for merge: refit down projections (profile --refit-stats).", "--refit")
    merge_seed: int | None = option(
        None, "With --for merge: the merge method's seed (k-means).", min=0, max=parse.MAX_SEED
    )
    objective: str = option("kl", "esap (Σ min(p, q)) or kl (KL(p‖q)) against the original, on calibration tokens.")
    top_k: str = option("keep", TOP_K_HELP, "--top-k")
    active_ratio: float | None = option(
        None, "With --top-k search: share of the searched layers' experts per token kept, in (0, 1)."
    )
    samples: int = option(16, "Calibration windows the candidates are judged on.")
    seq_len: int | None = option(None, "Tokens per window (default: the statistics').")
    top_logprobs: int = option(2048, "The original's most likely tokens stored per position (all when >= vocabulary).")
    batch_size: int = option(8, "Windows per forward pass.")
    budget_evals: int = option(64, BUDGET_EVALS_HELP)
    seed: int = option(0, "Seed of the search's move order.", min=0, max=parse.MAX_SEED)
    min_per_layer: int | None = option(None, "Fewest experts a searched layer keeps (default and minimum: top-k).")
    skip_layers: list[int] | None = option(
        None,
        "Comma-separated MoE layers kept whole and left out of the budget.",
        cli_type=str | None,
        parse=parse.layer_numbers,
    )
    sequential: bool = option(False, "Refused: every candidate is a whole forward pass (see README).", "--sequential")
    dtype: str = like(ModelLoading, "dtype")
    device: str = like(ModelLoading, "device")
    trust_remote_code: bool = like(ModelLoading, "trust_remote_code")
