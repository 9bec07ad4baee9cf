"""One MoE layer's expert tensors while a merge computes them, and the computed outputs they feed.

The writer asks for a computed tensor's bytes when it reaches it (`computed`); the slot it belongs to is
merged then (`LayerExperts.take`): its cluster's anchor is read (dequantized, float32), each other member
read, aligned to it and added to the weighted sum one at a time, and every output tensor of the slot is
finished at once (cast to the checkpoint's dtype, or quantized in its format with fresh scales:
`quantized.quantize`) and kept only until the writer takes it. Alive at once: one member, the anchor, the
sum, and the finished tensors not yet written, which for per-expert checkpoints (written slot by slot) is
one slot and for fused `[E, ...]` tensors at most the layer's merged output in its own dtype; never the
layer's experts in float32 (issue #24's memory contract: merge held 4 layers' worth at Qwen3-30B-A3B's shapes).
Merging a slot on its own gives the same bits as merging the layer at once: the same float32 operations in
the same order per element.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from moe_prune.architectures.spec import ExpertTensor
from moe_prune.checkpoint.expert_slices import fused_expert, rows
from moe_prune.checkpoint.quantized import Stored, check_requantizable, read_expert_tensor
from moe_prune.checkpoint.safetensors_io import DTYPE_BITS, FLOAT_DTYPES, ComputedTensor, TensorInfo, tensor_bytes
from moe_prune.errors import MoePruneError
from moe_prune.merging.alignment import Expert, align
from moe_prune.merging.averaging import weighted_average
from moe_prune.merging.layer_plan import LayerPlan
from moe_prune.merging.refit import down_tensor, is_down

Finish = Callable[[torch.Tensor], Any]  # a merged float32 tensor -> what its output is made of


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
    """One layer's expert tensors and its merged slots, each computed when the writer first needs it."""

    plan: LayerPlan
    n_experts: int
    per_expert: dict[str, dict[int, Stored]] = field(default_factory=dict)  # tail -> slot -> info
    fused: dict[str, Stored] = field(default_factory=dict)  # name -> [E, ...] tensor
    fused_tail: dict[str, int] = field(default_factory=dict)  # name -> rows past the experts' (Adapter.tail_experts)
    layouts: dict[str, ExpertTensor] = field(default_factory=dict)
    _finish: dict[tuple[int, str], Finish] = field(default_factory=dict)  # (slot, key) an output will take
    _ready: dict[tuple[int, str], Any] = field(default_factory=dict)  # finished, not yet taken
    _merged: set[int] = field(default_factory=set)  # slots computed once

    def check(self) -> None:
        """Every member of a cluster has every per-expert tensor (before anything is written)."""
        needed = sorted({m for c in self.plan.clusters for m in c.members}) if self.plan.refit is None else []
        for tail, slots in self.per_expert.items():
            for slot in needed:
                if slot not in slots:
                    sibling = next(iter(slots.values()))
                    raise MoePruneError(
                        f"{sibling.file}: MoE layer {self.plan.layer} has no {tail!r} tensor for expert {slot}"
                    )

    def want(self, index: int, key: str, finish: Finish) -> None:
        """An output will take tensor `key` of merged slot `index`, made by `finish` from the float32 merge."""
        self._finish[(index, key)] = finish

    def take(self, index: int, key: str) -> Any:
        """Finished tensor `key` of slot `index`: the slot is merged on first need, the tensor forgotten once taken."""
        if (index, key) not in self._ready:
            again = index in self._merged  # taken before: remake only this one (nothing else to keep alive)
            merged = self._merge(index)
            self._merged.add(index)
            for (slot, name), finish in self._finish.items():
                if slot == index and (name == key or not again):
                    self._ready[(slot, name)] = finish(merged[name])
        return self._ready.pop((index, key))

    def _merge(self, index: int) -> Expert:
        """Slot `index` in float32: the refit down projection, or its cluster's weighted average (module docstring)."""
        if self.plan.refit is not None:
            downs = [key for key, layout in self.layouts.items() if is_down(layout)]
            return {key: down_tensor(self.plan.refit[index], self.layouts[key]) for key in downs}
        cluster = self.plan.clusters[index]
        anchor = self.read(cluster.anchor)

        def members() -> Iterator[Expert]:
            for m in cluster.members:
                yield anchor if m == cluster.anchor else align(self.read(m), anchor, self.layouts)

        return weighted_average(members(), self.plan.weights[index])

    def read(self, slot: int) -> Expert:
        """Expert `slot`'s tensors in float32 (of fused tensors, its own rows only)."""
        expert = {tail: read_float_expert(slots[slot]) for tail, slots in self.per_expert.items()}
        for name, info in self.fused.items():
            expert[name] = read_float_expert(fused_expert(info, self.n_experts, slot, self.fused_tail.get(name, 0)))
        return expert

    def tail_rows(self, name: str) -> torch.Tensor:
        """The rows of fused tensor `name` past the experts' (kept as they are), in float32."""
        info = self.fused[name]
        shape, tail = info.data.shape, self.fused_tail.get(name, 0)
        past = rows(info.data, shape[0] - tail, shape[0], (tail, *shape[1:]))
        return read_float_expert(Stored(name, past))

    def expert_shapes(self) -> dict[str, tuple[int, ...]]:
        """One expert's shape per tensor key (fused tensors without their leading expert axis)."""
        shapes = {key: tuple(next(iter(slots.values())).shape) for key, slots in self.per_expert.items()}
        return shapes | {key: tuple(info.shape[1:]) for key, info in self.fused.items()}


def torch_dtype(info: TensorInfo) -> torch.dtype:
    return getattr(torch, FLOAT_DTYPES[info.dtype])


def computed(name: str, info: TensorInfo, shape: tuple[int, ...], fn: Callable[[], bytes]) -> ComputedTensor:
    """An output of `info`'s dtype and `shape` whose bytes `fn` makes when the writer reaches it."""
    return ComputedTensor(name, info.dtype, shape, math.prod(shape) * DTYPE_BITS[info.dtype] // 8, fn)


def requantized(stored: Stored, names: tuple[str, ...], float_shape: tuple[int, ...], fn: Callable[[], tuple]):
    """Data and scale outputs of a merged quantized tensor; `fn()` gives (data, scale) tensors, made once."""
    shapes = quantized_shapes(stored, float_shape)
    made: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def part(index: int) -> Callable[[], bytes]:
        def produce() -> bytes:
            if "parts" not in made:
                made["parts"] = fn()
            data = tensor_bytes(made["parts"][index])
            if index == len(names) - 1:
                made.clear()
            return data

        return produce

    parts = zip(names, stored.infos, shapes, strict=True)
    return [computed(name, info, shape, part(i)) for i, (name, info, shape) in enumerate(parts)]


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
    height, width = float_shape[-2:]
    grid = (*float_shape[:-2], -(-height // block[0]), -(-width // block[1]))
    return float_shape, grid
