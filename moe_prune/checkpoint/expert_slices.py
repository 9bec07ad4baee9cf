"""One expert's block of a fused expert tensor as its own byte range, so a merge reads a cluster's members
and never a whole layer's tensor (issue #24's memory contract: a layer of float32 copies is 2x the layer)."""

from __future__ import annotations

from dataclasses import replace

from moe_prune.checkpoint.quantized import Stored
from moe_prune.checkpoint.safetensors_io import rows
from moe_prune.errors import MoePruneError


def fused_expert(stored: Stored, n_experts: int, slot: int, tail: int = 0) -> Stored:
    """Expert `slot` of fused `stored`, as the model classes cut it: `[E, ...]` gives one `[...]`, E equal
    row blocks (dbrx's `[E*I, H]`) one `[I, H]`; `tail` rows past the experts' are not the experts'. A quantized
    tensor's scales are cut the same way (a single per-tensor scale is every expert's)."""
    data = stored.data
    count = data.shape[0] - tail if data.shape else 0
    if not data.shape or count % n_experts:
        raise MoePruneError(
            f"{stored.file}: {stored.name} has shape {data.shape}, which does not split into {n_experts} experts"
        )
    per = count // n_experts
    shape = data.shape[1:] if per == 1 else (per, *data.shape[1:])
    scale = stored.scale
    if scale is not None and scale.numel != 1:
        if not scale.shape or scale.shape[0] != n_experts or per != 1:
            raise MoePruneError(f"{stored.file}: {stored.name}'s scales do not split into {n_experts} experts")
        scale = rows(scale, slot, slot + 1, scale.shape[1:])
    return replace(stored, data=rows(data, slot * per, (slot + 1) * per, shape), scale=scale)
