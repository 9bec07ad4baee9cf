"""`prune`: apply a drop mask to a checkpoint by streaming its shards (never loading the model)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from moe_prune.architectures.config import ModelConfig
from moe_prune.architectures.mtp import set_mtp_count
from moe_prune.artifacts.mask import DropMask as DropMask
from moe_prune.checkpoint.edit import Edit, Written, stage_mtp, write_edit
from moe_prune.checkpoint.ragged import expert_count_config
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.checkpoint.surgery import check_routers_finite, plan_expert_selection
from moe_prune.io.output import check_writable
from moe_prune.sizes import parse_size


@dataclass
class PruneResult(Written):
    """What `prune` wrote, for the CLI's table and JSON.

    `experts_before` / `experts_after` are the largest per-layer counts; the per-layer dicts hold all of them
    (they differ between layers after a non-uniform mask, whose checkpoint then needs `trust_remote_code`).
    """

    experts_before: int
    experts_after: int
    top_k: int
    kept: dict[int, list[int]]
    warnings: list[str] = field(default_factory=list)
    experts_before_per_layer: dict[int, int] = field(default_factory=dict)
    experts_after_per_layer: dict[int, int] = field(default_factory=dict)
    model_code: list[str] = field(default_factory=list)

    @property
    def ragged(self) -> bool:
        return len(set(self.experts_after_per_layer.values())) > 1

    def to_dict(self) -> dict:
        return {
            **super().to_dict(),
            "experts_before": self.experts_before,
            "experts_after": self.experts_after,
            "experts_before_per_layer": {str(k): v for k, v in self.experts_before_per_layer.items()},
            "experts_after_per_layer": {str(k): v for k, v in self.experts_after_per_layer.items()},
            "ragged": self.ragged,
            "model_code": self.model_code,
            "top_k": self.top_k,
            "kept": {str(k): v for k, v in self.kept.items()},
            "warnings": self.warnings,
        }


def top_k_warnings(counts: dict[int, int], top_k: int) -> list[str]:
    """One line per clipping: globally when no layer has top-k experts, else per layer that has fewer."""
    largest = max(counts.values())
    if largest < top_k:
        return [f"top-k {top_k} is more than the {largest} experts kept; top-k set to {largest}"]
    return [
        f"layer {layer}: top-k {top_k} is more than the {n} experts kept; that layer uses {n} per token"
        for layer, n in counts.items()
        if n < top_k
    ]


def run(
    model: str | Path,
    mask: DropMask,
    out: Path,
    max_shard_size: str | int = "5GB",
    force: bool = False,
    mask_name: str = "mask",
    progress: Callable[[int, int], None] | None = None,
    drop_mtp: bool = False,
) -> PruneResult:
    """Drop the mask's experts, slice routers and per-expert biases, fix the config, reshard.

    Different keep counts per layer give a checkpoint with `modeling_moe_prune.py` (see checkpoint/ragged.py).
    Multi-token-prediction layers get the last MoE layer's selection, or are removed with `drop_mtp`.
    `progress(done_bytes, total_bytes)` reports copying; it lets the CLI draw a bar.
    """
    max_bytes = parse_size(max_shard_size, "--max-shard-size")
    check_writable(out, force, "folder")
    ckpt = Checkpoint.open(model)
    config = ckpt.config
    mask.model.require_same(ckpt.identity, mask_name, str(ckpt.folder))
    mask.validate_groups(config.n_group, mask_name)

    identity = ckpt.identity
    keep_slots = {
        layer: [slot for slot, orig in enumerate(identity.original_ids[layer]) if orig in set(kept)]
        for layer, kept in mask.keep.items()
    }
    counts = {layer: len(slots) for layer, slots in keep_slots.items()}
    mtp = stage_mtp(ckpt, counts, drop_mtp)
    check_routers_finite(mtp, config.adapter, "prune", mtp=not drop_mtp)  # expert bytes are copied unread
    new_raw, model_files = expert_count_config(config.raw, config.adapter, counts, config.top_k)
    if drop_mtp:
        set_mtp_count(new_raw, config.text_key, mtp.layout.family, 0)
    new_config = ModelConfig.from_dict(new_raw, config.source)
    warnings = top_k_warnings(counts, config.top_k)
    tensors = plan_expert_selection(mtp.decoder, config.adapter, config.experts_per_layer, keep_slots)

    slots = {layer: tuple(sorted(kept, key=identity.original_ids[layer].index)) for layer, kept in mask.keep.items()}
    follow = config.moe_layers[-1]
    if not drop_mtp:
        tensors += mtp.plan_selection(identity.experts_in(follow), keep_slots[follow])
    step = {"stage": "prune", "source": str(model), "mask": mask.to_dict()}
    edit = Edit(ckpt, new_config, tensors, step, slots, mtp, "kept", drop_mtp, model_files=model_files)
    written = write_edit(edit, Path(out), max_bytes, force=force, progress=progress)
    return PruneResult(
        **vars(written),
        experts_before=max(config.experts_per_layer.values()),
        experts_after=max(counts.values()),
        top_k=new_config.top_k,
        kept={layer: list(kept) for layer, kept in mask.keep.items()},
        warnings=warnings,
        experts_before_per_layer=config.experts_per_layer,
        experts_after_per_layer=counts,
        model_code=sorted(model_files),
    )
