"""`prune`: apply a drop mask to a checkpoint by streaming its shards (never loading the model).

A prune is the shrink (`stages.shrink`) whose every output slot is one kept expert with weight 1, so its
experts, like every tensor it does not cut, are copied byte for byte and never decoded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_prune.architectures.config import ModelConfig
from moe_prune.artifacts.mask import DropMask as DropMask
from moe_prune.errors import MoePruneError
from moe_prune.merging.layer_plan import LayerPlan
from moe_prune.stages.shrink import Shrink, Shrunk


@dataclass
class PruneResult(Shrunk):
    """What `prune` wrote, for the CLI's table and JSON: `kept` original ids per layer besides the shared counts.

    `experts_before` / `experts_after` are the largest per-layer counts; the per-layer dicts hold all of them
    (they differ between layers after a non-uniform mask, whose checkpoint then needs `trust_remote_code`).
    """

    kept: dict[int, list[int]]

    @property
    def experts_before(self) -> int:
        return max(self.experts_before_per_layer.values())

    @property
    def experts_after(self) -> int:
        return max(self.experts_after_per_layer.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "experts_before": self.experts_before,
            "experts_after": self.experts_after,
            "kept": {str(k): v for k, v in self.kept.items()},
        }


def check_top_k(mask: DropMask, config: ModelConfig, mask_name: str) -> None:
    """A mask's per-layer top-k (`allocate --top-k search`) only lowers the model's: routing was never trained
    with more experts per token than the model's top-k."""
    for layer, k in (mask.top_k or {}).items():
        if k > config.top_k:
            raise MoePruneError(f"{mask_name}: layer {layer} top_k {k} is above the model's top-k {config.top_k}")


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
    shrink = Shrink(model, out, max_shard_size, force)
    ckpt = shrink.ckpt
    mask.model.require_same(ckpt.identity, mask_name, str(ckpt.folder))
    mask.validate_groups(ckpt.config.n_group, mask_name)
    original = ckpt.identity.original_ids
    keep_slots = {
        layer: [slot for slot, orig in enumerate(original[layer]) if orig in set(kept)]
        for layer, kept in mask.keep.items()
    }
    check_top_k(mask, ckpt.config, mask_name)
    shrink.target({layer: len(slots) for layer, slots in keep_slots.items()}, drop_mtp, "prune", mask.top_k)
    plans = {layer: LayerPlan.selection(layer, slots) for layer, slots in keep_slots.items()}
    step = {"stage": "prune", "source": str(model), "mask": mask.to_dict()}
    shrunk = shrink.write(plans, step, "kept", progress)
    return PruneResult(**vars(shrunk), kept={layer: list(kept) for layer, kept in mask.keep.items()})
