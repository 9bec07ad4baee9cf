"""`prune`: apply a drop mask to a checkpoint by streaming its shards (never loading the model)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from moe_prune.artifacts.manifest import Manifest
from moe_prune.artifacts.mask import DropMask
from moe_prune.checkpoint.output import atomic_folder, check_writable
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.checkpoint.surgery import plan_expert_selection
from moe_prune.checkpoint.writer import parse_size, write_checkpoint
from moe_prune.errors import MoePruneError


@dataclass
class PruneResult:
    """What `prune` wrote, for the CLI's table and JSON."""

    out: Path
    experts_before: int
    experts_after: int
    top_k: int
    bytes_before: int
    bytes_after: int
    shards: list[str]
    kept: dict[int, list[int]]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "out": str(self.out),
            "experts_before": self.experts_before,
            "experts_after": self.experts_after,
            "top_k": self.top_k,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "shards": self.shards,
            "kept": {str(k): v for k, v in self.kept.items()},
            "warnings": self.warnings,
        }


def run(
    model: str | Path,
    mask: DropMask,
    out: Path,
    max_shard_size: str | int = "5GB",
    force: bool = False,
    mask_name: str = "mask",
    progress: Callable[[int, int], None] | None = None,
) -> PruneResult:
    """Drop the mask's experts, slice routers and per-expert biases, fix the config, reshard.

    `progress(done_bytes, total_bytes)` reports copying; it lets the CLI draw a bar.
    """
    max_bytes = parse_size(max_shard_size)
    check_writable(out, force)
    ckpt = Checkpoint.open(model)
    config = ckpt.config
    mask.model.require_same(ckpt.identity, mask_name, str(ckpt.folder))
    if not mask.is_uniform:
        counts = {layer: len(kept) for layer, kept in mask.keep.items()}
        raise MoePruneError(
            f"{mask_name}: keeps different numbers of experts per layer {counts}; stock transformers needs the same "
            "count in every MoE layer (non-uniform pruning is not supported yet)"
        )
    mask.validate_groups(config.n_group, mask_name)

    identity = ckpt.identity
    keep_slots = {
        layer: [slot for slot, orig in enumerate(identity.original_ids[layer]) if orig in set(kept)]
        for layer, kept in mask.keep.items()
    }
    kept_count = len(next(iter(keep_slots.values())))
    warnings = []
    top_k = config.top_k
    if kept_count < top_k:
        warnings.append(f"top-k {top_k} is more than the {kept_count} experts kept; top-k set to {kept_count}")
        top_k = kept_count
    tensors = plan_expert_selection(ckpt.tensors, config.adapter, config.num_experts, keep_slots)

    previous = ckpt.manifest.history if ckpt.manifest else []
    manifest = Manifest(
        slots={layer: tuple(sorted(kept, key=identity.original_ids[layer].index)) for layer, kept in mask.keep.items()},
        history=[*previous, {"stage": "prune", "source": str(model), "mask": mask.to_dict()}],
    )
    new_config = config.with_expert_count(kept_count, top_k)
    total = sum(t.nbytes for t in tensors)
    done = 0

    def advance(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress:
            progress(done, total)

    with atomic_folder(Path(out), force, protect=(ckpt.folder,)) as tmp:
        shards = write_checkpoint(tmp, ckpt.folder, tensors, new_config, manifest, max_bytes, advance)
        bytes_after = sum((tmp / s).stat().st_size for s in shards)
    return PruneResult(
        out=Path(out),
        experts_before=config.num_experts,
        experts_after=kept_count,
        top_k=top_k,
        bytes_before=ckpt.total_bytes(),
        bytes_after=bytes_after,
        shards=shards,
        kept={layer: list(kept) for layer, kept in mask.keep.items()},
        warnings=warnings,
    )
