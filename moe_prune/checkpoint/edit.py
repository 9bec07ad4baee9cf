"""The checkpoint side of the one shrink pipeline (`stages.shrink`): MTP staging, manifest entry, atomic write.

`prune` and `merge` edit the expert axis of a checkpoint by streaming its shards, through one plan and one
planner; the multi-token-prediction check, the history entry, the MTP notes and records, the manifest and
the write are done here once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_prune.architectures.config import ModelConfig
from moe_prune.architectures.mtp import mtp_layout
from moe_prune.artifacts.manifest import Manifest, MtpRecord
from moe_prune.checkpoint.mtp_tensors import MtpTensors, mtp_records, unplaced_error
from moe_prune.checkpoint.ragged import base_class
from moe_prune.checkpoint.safetensors_io import AnyOutput
from moe_prune.checkpoint.serving import ragged_mtp_architecture
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.checkpoint.writer import write_output
from moe_prune.errors import MoePruneError


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
        mtp_dropped=mtp.steps if edit.drop_mtp else 0,
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


def stage_mtp(ckpt: Checkpoint, counts: Mapping[int, int], drop: bool) -> MtpTensors:
    """A stage's MTP tensors, checked: each MTP MoE block will get the last MoE layer's selection or plan.

    Masks and statistics cannot describe MTP layers (transformers never runs them, so `profile` cannot
    measure them), so the last decoder MoE layer, the one whose output the MTP layer continues, decides.
    Refused: per-layer expert counts (vLLM and SGLang size the MTP MoE from the config's one count), unless
    moe-prune's vLLM plugin sizes the family's MTP layers (`checkpoint.serving.ragged_mtp_architecture`), and
    MTP layers whose experts are not known to be those of that layer.
    """
    config = ckpt.config
    split = MtpTensors.split(ckpt.tensors, mtp_layout(config.adapter, config.text, config.num_layers))
    if drop:
        return split
    if split.unplaced:  # MTP experts outside any layer the layout places: copying them would leave them unedited
        raise unplaced_error(split.unplaced[0], split.layout, "; pass --drop-mtp to remove them")
    if not split.moe:
        return split
    prefixes = ", ".join(split.prefixes().values())
    if len(set(counts.values())) > 1 and not ragged_mtp_architecture(base_class(config)):
        raise MoePruneError(
            f"{ckpt.folder}: the result would keep different expert counts per layer, but its multi-token-prediction "
            f"layers ({prefixes}) hold MoE blocks that vLLM and SGLang size from the one expert count in config.json "
            "(moe-prune's vLLM plugin sizes them only for the families README 'Serving' lists); keep one count in "
            "every layer, or pass --drop-mtp"
        )
    follow = config.moe_layers[-1]
    manifest = ckpt.manifest
    ids = ckpt.identity.original_ids[follow]
    members = manifest.merged.get(follow) if manifest else None
    for index, prefix in split.prefixes().items():
        record = manifest.mtp.get(index) if manifest else MtpRecord(prefix, follow, ids)
        if record is None or (record.follows, record.slots, record.members) != (follow, ids, members):
            raise MoePruneError(
                f"{ckpt.folder}: moe_prune.json does not say that multi-token-prediction layer {prefix} holds the "
                f"experts of layer {follow}; pass --drop-mtp to remove it"
            )
    return split
