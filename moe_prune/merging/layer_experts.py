"""One MoE layer's expert tensors while a merge computes them, and the computed outputs they feed.

The writer asks for a computed tensor's bytes when it reaches it: the layer's experts are then read
(dequantized, float32), aligned and averaged once, and released after the layer's last computed output
(`LayerExperts.take`). Quantized experts are written back in their format with fresh scales
(`quantized.quantize`): `requantized` gives the data and scale outputs of one merged tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from moe_prune.architectures.spec import ExpertTensor
from moe_prune.checkpoint.quantized import Stored, check_requantizable, read_expert_tensor, split_experts
from moe_prune.checkpoint.safetensors_io import DTYPE_BITS, FLOAT_DTYPES, ComputedTensor, TensorInfo, tensor_bytes
from moe_prune.errors import MoePruneError
from moe_prune.merging.alignment import Expert, align
from moe_prune.merging.averaging import weighted_average
from moe_prune.merging.layer_plan import LayerPlan
from moe_prune.merging.refit import down_tensor, is_down


def read_float_expert(info: Stored) -> torch.Tensor:
    return read_expert_tensor(info, "merging would spread them")


def require_float(info: Stored) -> None:
    """Quantized tensors merge in their own format; other non-float tensors cannot be averaged."""
    if info.quantized:
        check_requantizable(info)
    elif info.data.dtype not in FLOAT_DTYPES:
        raise MoePruneError(
            f"{info.file}: {info.name} is {info.data.dtype} (quantised?); merging averages weights and needs float "
            "expert tensors (F32, F16, BF16), or FP8 / MXFP4 with their scales and quantization_config: "
            "dequantise first, or use --method prune"
        )


@dataclass
class LayerExperts:
    """One layer's expert tensors and the lazily computed merged experts."""

    plan: LayerPlan
    n_experts: int
    per_expert: dict[str, dict[int, Stored]] = field(default_factory=dict)  # tail -> slot -> info
    fused: dict[str, Stored] = field(default_factory=dict)  # name -> [E, ...] tensor
    fused_tail: dict[str, int] = field(default_factory=dict)  # name -> rows past the experts' (Adapter.tail_experts)
    layouts: dict[str, ExpertTensor] = field(default_factory=dict)
    pending: int = 0
    _merged: list[Expert] | None = None

    def _load(self) -> dict[int, Expert]:
        needed = sorted({m for c in self.plan.clusters for m in c.members})
        experts: dict[int, Expert] = {slot: {} for slot in needed}
        for tail, slots in self.per_expert.items():
            for slot in needed:
                if slot not in slots:
                    sibling = next(iter(slots.values()))
                    raise MoePruneError(
                        f"{sibling.file}: MoE layer {self.plan.layer} has no {tail!r} tensor for expert {slot}"
                    )
                experts[slot][tail] = read_float_expert(slots[slot])
        for name, info in self.fused.items():
            data = read_float_expert(info)
            blocks = split_experts(data[: data.shape[0] - self.fused_tail.get(name, 0)], self.n_experts, info)
            for slot in needed:
                experts[slot][name] = blocks[slot].clone()
        return experts

    def merged(self) -> list[Expert]:
        """Merged expert of every cluster, in slot order (computed once, then reused until released)."""
        if self._merged is None and self.plan.refit is not None:
            downs = [key for key, layout in self.layouts.items() if is_down(layout)]
            self._merged = [{key: down_tensor(d, self.layouts[key]) for key in downs} for d in self.plan.refit]
        if self._merged is None:
            experts = self._load()
            result = []
            for cluster, weights in zip(self.plan.clusters, self.plan.weights, strict=True):
                anchor = experts[cluster.anchor]
                aligned = [
                    anchor if m == cluster.anchor else align(experts[m], anchor, self.layouts) for m in cluster.members
                ]
                result.append(weighted_average(aligned, weights))
            self._merged = result
        return self._merged

    def expert_shapes(self) -> dict[str, tuple[int, ...]]:
        """One expert's shape per tensor key (fused tensors without their leading expert axis)."""
        shapes = {key: tuple(next(iter(slots.values())).shape) for key, slots in self.per_expert.items()}
        return shapes | {key: tuple(info.shape[1:]) for key, info in self.fused.items()}

    def take(self, fn) -> bytes:
        """Bytes of one output computed from the merged experts; frees them after the layer's last output."""
        data = fn(self.merged())
        self.pending -= 1
        if self.pending <= 0:
            self._merged = None
        return data


def torch_dtype(info: TensorInfo) -> torch.dtype:
    return getattr(torch, FLOAT_DTYPES[info.dtype])


def computed(name: str, info: TensorInfo, shape: tuple[int, ...], layer: LayerExperts | None, fn) -> ComputedTensor:
    nbytes = math.prod(shape) * DTYPE_BITS[info.dtype] // 8
    if layer is None:
        return ComputedTensor(name, info.dtype, shape, nbytes, fn)
    layer.pending += 1
    return ComputedTensor(name, info.dtype, shape, nbytes, lambda: layer.take(fn))


def requantized(stored: Stored, names: tuple[str, ...], float_shape: tuple[int, ...], layer: LayerExperts, fn):
    """Data and scale outputs of a merged quantized tensor; `fn(merged)` gives (data, scale) tensors, made once."""
    shapes = quantized_shapes(stored, float_shape)
    made: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def part(index: int):
        def produce(merged: list[Expert]) -> bytes:
            if "parts" not in made:
                made["parts"] = fn(merged)
            data = tensor_bytes(made["parts"][index])
            if index == len(names) - 1:
                made.clear()
            return data

        return produce

    parts = zip(names, stored.infos, shapes, strict=True)
    return [computed(name, info, shape, layer, part(i)) for i, (name, info, shape) in enumerate(parts)]


def quantized_shapes(stored: Stored, float_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(data shape, scale shape) of `float_shape` quantized like `stored`, without computing it."""
    assert stored.scale is not None
    if stored.method == "mxfp4":
        *lead, width, out = float_shape
        return (*lead, out, width // 32, 16), (*lead, out, width // 32)
    if stored.scale.numel == 1:
        return float_shape, stored.scale.shape
    block = stored.block
    assert block is not None
    rows, cols = float_shape[-2:]
    grid = (*float_shape[:-2], -(-rows // block[0]), -(-cols // block[1]))
    return float_shape, grid
