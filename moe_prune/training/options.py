"""What one finetuning run is asked to do: the spec lives in `specs.finetune` (these are its older names)."""

from __future__ import annotations

from moe_prune.specs.finetune import FORMATS, MIXED_PRECISION, TRAIN_GROUPS, FinetuneOptions
from moe_prune.specs.parse import anneal, comma_list


def parse_anneal(text: str) -> tuple[int, int] | None:
    """'4:2' -> (4, 2): top-k goes from 4 to 2 over the run (`specs.parse.anneal`)."""
    return anneal(text)


def parse_train(text: str) -> tuple[str, ...]:
    """'router,attention' -> ('router', 'attention') (`specs.parse.comma_list`)."""
    return comma_list(text)


__all__ = ["FORMATS", "MIXED_PRECISION", "TRAIN_GROUPS", "FinetuneOptions", "parse_anneal", "parse_train"]
