"""What one finetuning run is asked to do: `stages.finetune.run`'s options, `moe-prune finetune`'s options,
the manifest's recorded "options" and the resume fingerprint (every field marked as changing the result)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from moe_prune.errors import MoePruneError
from moe_prune.specs import parse
from moe_prune.specs.fields import fingerprint, like, option
from moe_prune.specs.groups import TRAIN, ModelLoading, TextData, Training

TRAIN_GROUPS = ("all", "router", "experts", "attention")
MIXED_PRECISION = ("no", "bf16", "fp16")
# text: chunks of a token stream, every token carries loss; chat/completion: prompt/response JSONL records,
# loss on the response tokens only (`training.sft`).
FORMATS = ("text", "chat", "completion")
ROUTING = "Routing"
STATE = "Checkpoints"
FORMAT_HELP = (
    "text: every token of --data trains (repeat --data to mix sources by share); completion: JSONL "
    "prompt/completion, loss on the completion; chat: JSONL messages, loss on assistant turns (chat "
    "template if the tokenizer has one); both read one --data file, without a share."
)
EOS_HELP = (
    "chat/completion: end each example with EOS, which carries loss (the model learns to stop); "
    "--no-eos for continuation data (a chat template ends turns its own way)."
)


@dataclass(frozen=True)
class FinetuneSpec(TextData, Training):
    """Next-token finetuning settings; `tokens` is the budget, the run takes as many whole steps as fit."""

    tokens: int = option(
        1_000_000,
        "Token budget, e.g. 1M, 250k (chat/completion: --seq-len per example).",
        panel=TRAIN,
        cli_type=str,
        cli_default="1M",
        parse=parse.tokens,
    )
    seed: int = option(0, "Seed of data order and randomness.", panel=TRAIN, min=0, max=parse.MAX_SEED)
    train: tuple[str, ...] = option(
        ("all",),
        "What trains: all, router, experts, attention (comma-separated).",
        panel=TRAIN,
        cli_type=str,
        cli_default="all",
        parse=parse.comma_list,
    )
    router_warmup_steps: int = option(0, "Train only the routers for this many steps first.", panel=TRAIN)
    mixed_precision: str | None = option(  # None: whatever `accelerate launch` / its config says
        None, "no, bf16 or fp16 (default: accelerate's config).", panel=TRAIN
    )
    top_k: int | None = option(None, "Route to k experts (static).", panel=ROUTING)  # for the whole run
    top_k_anneal: tuple[int, int] | None = option(  # (from, to), linear over the run
        None, "FROM:TO, top-k lowered linearly over the run.", panel=ROUTING, cli_type=str | None, parse=parse.anneal
    )
    entropy_weight: float = option(0.0, "Weight of the mean router entropy in the loss.", panel=ROUTING)
    aux_loss_weight: float = option(0.0, "Weight of the family's load-balancing loss.", panel=ROUTING)
    format: str = option("text", FORMAT_HELP, "--format", panel=TRAIN)  # one of FORMATS
    eos: bool = option(True, EOS_HELP, "--eos/--no-eos", panel=TRAIN)  # see training.sft
    eval_data: str | None = option(
        None,
        "Held-out data for the before/after table, in --format (default: demo held-out text).",
        affects_result=False,
    )
    eval_tokens: int = option(16_384, "Held-out tokens scored before and after (0: skip).", affects_result=False)
    save_every: int = option(0, "Save resumable state every N steps (0: never).", panel=STATE, affects_result=False)
    max_shard_size: str = option("5GB", "Largest output shard, e.g. 5GB, 500MB.", panel=STATE, affects_result=False)
    force: bool = option(False, "Replace an existing output.", "--force", affects_result=False)
    resume: bool = option(
        False, "Continue the interrupted run of this --out.", "--resume", panel=STATE, affects_result=False
    )
    trust_remote_code: bool = like(ModelLoading, "trust_remote_code")  # runtime/loading.py decides

    def check(self) -> None:
        """Refuse impossible settings before any model is loaded; the line names the option."""
        positive = {"tokens": self.tokens, "batch_size": self.batch_size, "grad_accum": self.grad_accum}
        for name, value in positive.items():
            if value < 1:
                raise MoePruneError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
        if self.seq_len < 2:
            raise MoePruneError(f"--seq-len must be at least 2 (got {self.seq_len})")
        for name in ("lr", "weight_decay", "warmup_ratio", "max_grad_norm", "entropy_weight", "aux_loss_weight"):
            if not math.isfinite(getattr(self, name)):
                raise MoePruneError(f"--{name.replace('_', '-')} must be a finite number (got {getattr(self, name)})")
        if self.lr <= 0:
            raise MoePruneError(f"--lr must be positive (got {self.lr})")
        if not 0 <= self.warmup_ratio < 1:
            raise MoePruneError(f"--warmup-ratio must be in [0, 1) (got {self.warmup_ratio})")
        for name in ("weight_decay", "max_grad_norm", "entropy_weight", "aux_loss_weight", "router_warmup_steps"):
            if getattr(self, name) < 0:
                raise MoePruneError(f"--{name.replace('_', '-')} must not be negative (got {getattr(self, name)})")
        if self.save_every < 0:
            raise MoePruneError(f"--save-every must not be negative (got {self.save_every})")
        if self.eval_tokens < 0:
            raise MoePruneError(f"--eval-tokens must not be negative (got {self.eval_tokens})")
        unknown = [g for g in self.train if g not in TRAIN_GROUPS]
        if unknown or not self.train:
            raise MoePruneError(f"--train {','.join(self.train)}: use one or more of {', '.join(TRAIN_GROUPS)}")
        if self.format not in FORMATS:
            raise MoePruneError(f"--format {self.format}: use one of {', '.join(FORMATS)}")
        from moe_prune.runtime.data import check_split_on

        check_split_on(self.split_on)
        self._check_top_k()
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise MoePruneError(f"--mixed-precision {self.mixed_precision}: use one of {', '.join(MIXED_PRECISION)}")

    def _check_top_k(self) -> None:
        """k >= 1, or an anneal that lowers k and never reaches 0 (the model's limit is checked after loading)."""
        if self.top_k is not None and self.top_k_anneal is not None:
            raise MoePruneError("--top-k and --top-k-anneal exclude each other")
        if self.top_k is not None and self.top_k < 1:
            raise MoePruneError(f"--top-k {self.top_k}: top-k must be at least 1")
        if self.top_k_anneal is not None:
            start, end = self.top_k_anneal
            if min(start, end) < 1:
                raise MoePruneError(f"--top-k-anneal {start}:{end}: top-k must be at least 1 at both ends")
            if end > start:
                raise MoePruneError(f"--top-k-anneal {start}:{end}: annealing lowers top-k, so FROM must be >= TO")

    def fingerprint_fields(self) -> dict[str, Any]:
        """The settings that decide the trained weights (JSON-ready): recorded in the manifest, matched on resume."""
        return fingerprint(self)


FinetuneOptions = FinetuneSpec  # the library's older name
