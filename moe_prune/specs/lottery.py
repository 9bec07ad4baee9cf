"""Everything that decides a lottery run's result: `stages.lottery.run`'s parameters, `moe-prune lottery`'s
options (each round's finetuning and profiling options are finetune's and profile's, reused) and the
`params` block of its recipe.json, which is also what a resumed run must match."""

from __future__ import annotations

from dataclasses import MISSING, dataclass
from typing import Any

from moe_prune.demo import DEMO_HELDOUT
from moe_prune.errors import MoePruneError
from moe_prune.specs import parse
from moe_prune.specs.fields import from_record, like, option
from moe_prune.specs.groups import Calibration, TextData, Training, data_help

PRUNING = "Pruning"
TRAIN = "Finetuning (each round)"
PROFILE = "Profiling (each round)"
EVAL = "Evaluation"
COMPARE_HELP = (
    "Also run one-shot, iterative, and one-shot + ONE finetune of the lottery's total tokens; compare the four."
)


@dataclass(frozen=True)
class LotteryParams:
    """Everything that decides a lottery run's result (see `moe-prune lottery --help` for each field)."""

    model: str = option(
        MISSING, "Model folder or hub id (default: the shipped demo model).", argument=True, show_default=False
    )
    criterion: str = option(MISSING, "Criterion (see `moe-prune score --list`).", "--criterion", "-c")
    data: str | list[str] = option(  # one `--data` value, or several SOURCE:SHARE values mixed (runtime.sources)
        MISSING,
        data_help(tasks=False),
        "--data",
        "-d",
        cli_type=list[str] | None,
        parse=parse.one_or_many,
        metavar="SOURCE[:SHARE]",
        show_default=False,
    )
    target_ratio: float = option(0.5, "Share of each layer's experts gone at the end.")
    rounds: int | None = option(  # None: one expert per layer per round (the paper)
        None, "Rounds k (default: one expert per layer per round).", panel=PRUNING
    )
    direction: str | None = option(None, "min or max (default: the criterion's).", panel=PRUNING)  # None: its own
    finetune: bool = option(
        True,
        "Iterative pruning: no finetuning between rounds.",
        "--no-finetune",
        cli_type=bool,
        cli_default=False,
        parse=parse.negate,
    )
    compare: bool = option(False, COMPARE_HELP, "--compare")
    tokens_first: int = option(
        200_000,
        "Round 1 tokens, doubling each round.",
        panel=TRAIN,
        cli_type=str,
        cli_default="200k",
        parse=parse.tokens,
    )
    lr: float = like(Training, "lr", panel=TRAIN)
    seq_len: int = like(Training, "seq_len", help="Tokens per training/eval sequence.", panel=TRAIN)
    batch_size: int = like(Training, "batch_size", panel=TRAIN)
    grad_accum: int = like(Training, "grad_accum", panel=TRAIN)
    weight_decay: float = like(Training, "weight_decay", panel=TRAIN)
    warmup_ratio: float = like(Training, "warmup_ratio", panel=TRAIN)
    max_grad_norm: float = like(Training, "max_grad_norm", panel=TRAIN)
    profile_samples: int = like(Calibration, "samples", panel=PROFILE)
    profile_seq_len: int = like(Calibration, "seq_len", help="Tokens per calibration sequence.", panel=PROFILE)
    profile_batch_size: int = like(Calibration, "batch_size", panel=PROFILE)
    seed: int = option(0, "Seed of calibration windows; round r trains with seed + r - 1.", min=0, max=parse.MAX_SEED)
    text_field: str = like(TextData, "text_field")
    split_on: str = like(TextData, "split_on")  # how .txt files become documents (runtime.data.SPLIT_ON)
    eval_data: str = option(str(DEMO_HELDOUT), "Held-out text (default: demo held-out).", panel=EVAL)
    eval_tokens: int = option(16_384, "Held-out tokens scored per round, 0: skip.", panel=EVAL)

    def check(self) -> None:
        """Cheap checks of the numbers alone (the rest needs the model)."""
        from moe_prune.runtime.data import check_split_on

        for name in ("profile_samples", "profile_batch_size", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise MoePruneError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if min(self.seq_len, self.profile_seq_len) < 2:
            raise MoePruneError("--seq-len and --profile-seq-len must be at least 2")
        if self.eval_tokens < 0:
            raise MoePruneError(f"--eval-tokens must not be negative (got {self.eval_tokens})")
        if self.direction not in (None, "min", "max"):
            raise MoePruneError(f"--direction must be min or max, not {self.direction!r}")
        check_split_on(self.split_on)
        if self.compare and not self.finetune:
            raise MoePruneError(
                "--compare runs one-shot, iterative, the lottery and one-shot + finetune (finetuning); "
                "drop --no-finetune"
            )

    @classmethod
    def from_dict(cls, obj: Any, name: str) -> LotteryParams:
        """The params block of a recipe file, every field of its declared JSON type (a recipe may be hand-edited)."""
        return from_record(cls, obj, name, required=("model", "criterion", "data"))


LotterySpec = LotteryParams
