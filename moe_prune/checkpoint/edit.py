"""What `prune` and `merge` share once their plan is made: the manifest entry, the atomic write, the summary.

Both stages edit the expert axis of a checkpoint by streaming its shards; they differ only in how the
output tensors are planned. The history entry, the multi-token-prediction notes and records, the manifest
and the write are the same job, done here once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_prune.architectures.config import ModelConfig
from moe_prune.artifacts.manifest import Manifest
from moe_prune.checkpoint.safetensors_io import AnyOutput
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.checkpoint.surgery import MtpTensors, mtp_records
from moe_prune.checkpoint.writer import write_output


@dataclass
class Edit:
    """A planned edit of `ckpt`: the output config and tensors plus what the manifest must record.

    `slots[layer]` are the original expert ids of the output's slots; `merged[layer]` the members of merged
    slots (empty for pruning); `mtp_verb` says what the multi-token-prediction blocks got from the last MoE layer.
    """

    ckpt: Checkpoint
    config: ModelConfig
    tensors: list[AnyOutput]
    step: dict[str, Any]
    slots: dict[int, tuple[int, ...]]
    mtp: MtpTensors
    mtp_verb: str
    drop_mtp: bool
    merged: dict[int, tuple] = field(default_factory=dict)
    model_files: dict[str, str] = field(default_factory=dict)


@dataclass
class Written:
    """The part of a `prune` or `merge` result both report."""

    out: Path
    bytes_before: int
    bytes_after: int
    shards: list[str]
    mtp: list[str]  # what became of the multi-token-prediction layers, one line each

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "shards": self.shards,
            "mtp": self.mtp,
        }


def write_edit(
    edit: Edit,
    out: Path,
    max_bytes: int,
    *,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Written:
    """Append the edit to the manifest history and write the output checkpoint atomically."""
    ckpt, mtp = edit.ckpt, edit.mtp
    follow = ckpt.config.moe_layers[-1]
    notes = mtp.notes(follow, edit.drop_mtp, edit.mtp_verb)
    previous = ckpt.manifest.history if ckpt.manifest else []
    records = {} if edit.drop_mtp else mtp_records(mtp, follow, edit.slots[follow], edit.merged.get(follow))
    manifest = Manifest(
        slots=edit.slots,
        history=[*previous, {**edit.step, "mtp": notes} if notes else edit.step],
        merged=edit.merged,
        mtp=records,
        mtp_dropped=len(mtp.layers) if edit.drop_mtp else 0,
    )
    shards, bytes_after = write_output(
        Path(out),
        ckpt.folder,
        edit.tensors,
        edit.config,
        manifest,
        max_bytes,
        force=force,
        model_files=edit.model_files,
        progress=progress,
    )
    return Written(Path(out), ckpt.total_bytes(), bytes_after, shards, notes)
