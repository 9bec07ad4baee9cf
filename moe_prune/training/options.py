"""What one finetuning run is asked to do: the spec lives in `specs.finetune` (these are its older names)."""

from __future__ import annotations

from moe_prune.specs.finetune import FORMATS, MIXED_PRECISION, TRAIN_GROUPS, FinetuneOptions

__all__ = ["FORMATS", "MIXED_PRECISION", "TRAIN_GROUPS", "FinetuneOptions"]
