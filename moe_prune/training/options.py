"""What one finetuning run is asked to do; every field that changes the result is part of its fingerprint."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from moe_prune.errors import MoePruneError
from moe_prune.runtime.data import check_split_on

TRAIN_GROUPS = ("all", "router", "experts", "attention")
MIXED_PRECISION = ("no", "bf16", "fp16")
# text: chunks of a token stream, every token carries loss; chat/completion: prompt/response JSONL records,
# loss on the response tokens only (`training.sft`).
FORMATS = ("text", "chat", "completion")
# Fields that change how a run is saved or shown, not what it computes (left out of the fingerprint).
NOT_IN_FINGERPRINT = {
    "save_every",
    "max_shard_size",
    "force",
    "resume",
    "eval_data",
    "eval_tokens",
    "trust_remote_code",
}


@dataclass(frozen=True)
class FinetuneOptions:
    """Next-token finetuning settings; `tokens` is the budget, the run takes as many whole steps as fit."""

    tokens: int = 1_000_000
    seq_len: int = 256
    batch_size: int = 8  # sequences per micro-batch on each process
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05  # share of steps with a linear warm-up before the cosine decay
    max_grad_norm: float = 1.0  # 0 turns clipping off
    seed: int = 0
    train: tuple[str, ...] = ("all",)
    router_warmup_steps: int = 0
    top_k: int | None = None  # static top-k for the whole run
    top_k_anneal: tuple[int, int] | None = None  # (from, to), linear over the run
    entropy_weight: float = 0.0
    aux_loss_weight: float = 0.0
    mixed_precision: str | None = None  # None: whatever `accelerate launch` / its config says
    text_field: str = "text"
    split_on: str = "none"  # how .txt files of --data/--eval-data become documents (runtime.data.SPLIT_ON)
    format: str = "text"  # one of FORMATS
    eos: bool = True  # chat/completion: plain renderings end with EOS (with loss); see training.sft
    eval_data: str | None = None  # held-out text for the before/after table (default: the demo held-out set)
    eval_tokens: int = 16_384
    save_every: int = 0  # 0: no intermediate checkpoints
    max_shard_size: str = "5GB"
    force: bool = False
    resume: bool = False
    trust_remote_code: bool = False  # the checkpoint's own Python may run (runtime/loading.py decides)

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
        """The settings that decide the trained weights (JSON-ready)."""
        out = asdict(self)
        for name in NOT_IN_FINGERPRINT:
            out.pop(name)
        out["train"] = list(self.train)
        out["top_k_anneal"] = list(self.top_k_anneal) if self.top_k_anneal else None
        return out


def parse_anneal(text: str) -> tuple[int, int]:
    """'4:2' -> (4, 2): top-k goes from 4 to 2 over the run."""
    first, sep, last = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(first), int(last)
    except ValueError as exc:
        raise MoePruneError(f"--top-k-anneal {text!r}: expected FROM:TO, e.g. 2:1") from exc


def parse_train(text: str) -> tuple[str, ...]:
    """'router,attention' -> ('router', 'attention')."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


__all__ = ["FORMATS", "MIXED_PRECISION", "TRAIN_GROUPS", "FinetuneOptions", "parse_anneal", "parse_train"]
