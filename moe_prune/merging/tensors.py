"""The output tensors of a merged checkpoint, planned from shard headers and computed one layer at a time.

Untouched tensors (attention, norms, dense layers, skipped layers) are byte copies as in `prune`;
so are experts and router rows that pass through unchanged (a cluster of one expert, `--router
anchor`). Merged experts and averaged/re-initialised router rows are `ComputedTensor`s: a layer's
experts are read, aligned and averaged (in float32, cast back to the checkpoint's dtype) when the
writer reaches the first of that layer's computed tensors, and released after its last one.

Quantized checkpoints (FP8 with block scales, MXFP4): experts are read dequantized through
`checkpoint.quantized.read_float`, merged in float32 and written back in the checkpoint's format
with fresh scales (`quantized.quantize`), so the output keeps its quantization_config. Experts
that pass through unchanged keep their original bytes, in fused tensors too.

With a refit (`merging.refit`) every slot keeps its anchor's tensors byte for byte except the down
projection, which is the least-squares solution carried by the plan (nothing is read to compute it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from moe_prune.architectures.spec import Adapter, ExpertTensor
from moe_prune.checkpoint.quantized import (
    Quantization,
    Stored,
    check_requantizable,
    group,
    quantize,
    read_expert_tensor,
    split_experts,
)
from moe_prune.checkpoint.safetensors_io import (
    DTYPE_BITS,
    FLOAT_DTYPES,
    AnyOutput,
    ComputedTensor,
    TensorInfo,
    read_tensor,
    tensor_bytes,
)
from moe_prune.checkpoint.surgery import ExpertKey, KeyMatcher, router_rows, slice_expert_axis, whole
from moe_prune.errors import MoePruneError
from moe_prune.merging.alignment import Expert, align
from moe_prune.merging.averaging import weighted_average
from moe_prune.merging.clustering import Cluster
from moe_prune.merging.refit import check_layer, down_tensor, is_down

ROUTER_RULES = ("anchor", "average", "reinit")


@dataclass(frozen=True)
class LayerPlan:
    """What becomes of one MoE layer: its clusters (current slot ids), averaging weights and router rule."""

    layer: int
    clusters: list[Cluster]
    weights: list[tuple[float, ...]]
    router: str = "anchor"
    seed: int = 0
    refit: tuple[np.ndarray, ...] | None = None  # per cluster, the refit down projection D^T [I, H]

    @property
    def anchors(self) -> list[int]:
        return [c.anchor for c in self.clusters]

    @property
    def passthrough(self) -> bool:
        """True when every cluster is a single expert and nothing is refit: the experts are byte copies (pruning)."""
        return self.refit is None and all(len(c.members) == 1 for c in self.clusters)

    def computes(self, index: int, layout: ExpertTensor) -> bool:
        """Whether slot `index`'s tensor of this layout is computed (else it is its anchor's, byte for byte)."""
        if self.refit is not None:
            return is_down(layout)
        return len(self.clusters[index].members) > 1


def find_layout(name: str, rows: tuple[ExpertTensor, ...]) -> ExpertTensor:
    """The adapter row whose suffix ends `name` (at a dot boundary)."""
    for row in rows:
        if name == row.suffix or name.endswith("." + row.suffix):
            return row
    raise MoePruneError(
        f"{name}: merge does not know where this expert tensor's intermediate axis is; "
        "add it to `expert_tensors` of its row in moe_prune/architectures/table.py"
    )


def _read(info: Stored) -> torch.Tensor:
    return read_expert_tensor(info, "merging would spread them")


def _require_float(info: Stored) -> None:
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
class _LayerExperts:
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
                experts[slot][tail] = _read(slots[slot])
        for name, info in self.fused.items():
            data = _read(info)
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


def _torch_dtype(info: TensorInfo) -> torch.dtype:
    return getattr(torch, FLOAT_DTYPES[info.dtype])


def _computed(name: str, info: TensorInfo, shape: tuple[int, ...], layer: _LayerExperts | None, fn) -> ComputedTensor:
    nbytes = math.prod(shape) * DTYPE_BITS[info.dtype] // 8
    if layer is None:
        return ComputedTensor(name, info.dtype, shape, nbytes, fn)
    layer.pending += 1
    return ComputedTensor(name, info.dtype, shape, nbytes, lambda: layer.take(fn))


def _requantized(stored: Stored, names: tuple[str, ...], float_shape: tuple[int, ...], layer: _LayerExperts, fn):
    """Data and scale outputs of a merged quantized tensor; `fn(merged)` gives (data, scale) tensors, made once."""
    shapes = _quantized_shapes(stored, float_shape)
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
    return [_computed(name, info, shape, layer, part(i)) for i, (name, info, shape) in enumerate(parts)]


def _quantized_shapes(stored: Stored, float_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
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


class MergePlanner:
    """Turn shard headers plus per-layer plans into the output tensor list (see module docstring)."""

    def __init__(
        self,
        adapter: Adapter,
        n_experts: int,
        plans: dict[int, LayerPlan],
        quant: Quantization | None = None,
        per_layer: dict[int, int] | None = None,
    ) -> None:
        """`n_experts` sizes every layer unless `per_layer` gives a layer its own count (a ragged checkpoint)."""
        self.adapter = adapter
        self.counts = {layer: (per_layer or {}).get(layer, n_experts) for layer in plans}
        self.plans = plans
        self.quant = quant
        self.matcher = KeyMatcher(adapter)
        self.layers = {layer: _LayerExperts(plan, self.counts[layer]) for layer, plan in plans.items()}

    def plan(self, tensors: list[TensorInfo]) -> list[AnyOutput]:
        routers = {layer for t in tensors if (layer := self.matcher.is_router(t.name)) is not None}
        missing = sorted(set(self.plans) - routers)
        if missing:
            where = tensors[0].file.parent if tensors else "the checkpoint"
            raise MoePruneError(f"{where}: no router ({self.adapter.router}) in MoE layers {missing}")
        classified = [(info, self.matcher.classify(info.name)) for info in group(tensors, self.quant)]
        experts = [(i, k) for i, k in classified if k is not None and k.layer in self.plans and self._is_expert(i, k)]
        for info, key in experts:  # dtypes first: a stray scale tensor is explained by its unread weight
            if not self.plans[key.layer].passthrough:
                _require_float(info)
        for info, key in experts:
            self._collect(info, key)
        for layer in self.layers.values():
            if layer.plan.refit is not None:  # biases, unknown down tensors, statistics of other shapes refused
                where = f"{tensors[0].file.parent if tensors else 'the checkpoint'}: MoE layer {layer.plan.layer}"
                if self.adapter.expert_vectors:
                    raise MoePruneError(
                        f"{where}: --refit fits the down projection without the per-expert scale that multiplies it "
                        f"({', '.join(self.adapter.expert_vectors)}); merge without --refit"
                    )
                check_layer(layer.layouts, layer.expert_shapes(), layer.plan.refit[0], where)
        out: list[AnyOutput] = []
        for info, key in classified:
            if key is None or key.layer not in self.plans:
                out.extend(whole(part) for part in info.infos)
            elif self._is_expert(info, key):
                out.extend(self._expert_outputs(info, key))
            else:
                out.append(self._router_output(info, key))
        return out

    def _is_expert(self, info: Stored, key: ExpertKey) -> bool:
        if key.kind == "per_expert":
            return True
        bias = self.adapter.router_bias
        return (
            key.kind == "rows"
            and self.matcher.is_router(info.name) is None
            and not (bias and info.name.endswith(bias))
            and not self._is_vector(info.name)
            and not self._is_lockstep(info.name)
        )

    def _is_lockstep(self, name: str) -> bool:
        """A second expert set sized by the same count (jetmoe's attention experts): the anchors' slots, unmerged."""
        return any(name == v or name.endswith("." + v) for v in self.adapter.lockstep)

    def _is_vector(self, name: str) -> bool:
        """A per-expert vector (gemma4's router.per_expert_scale): it scales the routed expert's weight, so it
        follows the router rule (the anchor's value, or the members' weighted mean) instead of being averaged
        with the experts, which would scale an unchanged anchor by its members' values."""
        return any(name == v or name.endswith("." + v) for v in self.adapter.expert_vectors)

    def _collect(self, info: Stored, key: ExpertKey) -> None:
        layer = self.layers[key.layer]
        if key.kind == "per_expert":
            assert key.slot is not None
            if key.slot >= self.counts[key.layer] and self.adapter.tail_experts:
                return  # a tail expert (longcat's zero expert): copied after the merged ones, not merged
            if key.slot >= self.counts[key.layer]:
                raise MoePruneError(
                    f"{info.file}: {info.name} names expert {key.slot} but the layer has {self.counts[key.layer]}"
                )
            layer.per_expert.setdefault(key.tail, {})[key.slot] = info
            layer.layouts[key.tail] = find_layout(key.tail, self.adapter.expert_tensors)
        else:
            if info.quantized and not layer.plan.passthrough and info.data.shape[0] != self.counts[key.layer]:
                raise MoePruneError(
                    f"{info.file}: {info.name} is quantized with experts blocked along rows ({info.data.shape}); "
                    "merge cannot write it back quantized: use --method prune"
                )
            layer.fused[info.name] = info
            layer.fused_tail[info.name] = router_rows(info.data, key, self.adapter, self.counts[key.layer], [])[0]
            layer.fused_tail[info.name] -= self.counts[key.layer]
            if layer.fused_tail[info.name] and info.quantized:
                raise MoePruneError(f"{info.file}: {info.name} is quantized with rows past the experts'; use prune")
            layer.layouts[info.name] = find_layout(info.name, self.adapter.expert_tensors)

    def _expert_outputs(self, info: Stored, key: ExpertKey) -> list[AnyOutput]:
        layer = self.layers[key.layer]
        plan = layer.plan
        if key.kind == "per_expert":
            assert key.slot is not None
            if key.slot >= self.counts[key.layer]:  # a tail expert: after the merged ones, unchanged
                slot = len(plan.clusters) + key.slot - self.counts[key.layer]
                return [
                    whole(part, new) for part, new in zip(info.infos, info.names(key.renumbered(slot)), strict=True)
                ]
            if key.slot not in plan.anchors:
                return []
            index = plan.anchors.index(key.slot)
            name = key.renumbered(index)
            names = info.names(name)
            if not plan.computes(index, layer.layouts[key.tail]):
                return [whole(part, new) for part, new in zip(info.infos, names, strict=True)]
            if info.quantized:
                return _requantized(info, names, info.shape, layer, lambda m: quantize(info, m[index][key.tail]))
            dtype = _torch_dtype(info.data)
            return [_computed(name, info.data, info.shape, layer, lambda m: tensor_bytes(m[index][key.tail].to(dtype)))]
        layout = layer.layouts[info.name]
        tail = layer.fused_tail[info.name]
        if plan.passthrough or (plan.refit is not None and not is_down(layout)):
            blocks, kept = router_rows(info.data, key, self.adapter, self.counts[key.layer], plan.anchors)
            return [slice_expert_axis(part, 0, blocks, kept) for part in info.infos]
        count = len(plan.clusters)
        shape = ((info.shape[0] - tail) // self.counts[key.layer] * count + tail, *info.shape[1:])
        if info.quantized:
            return _requantized(info, info.names(info.name), shape, layer, self._fused_quantized(info, plan, layout))
        dtype = _torch_dtype(info.data)

        def fused(merged: list[Expert]) -> bytes:
            stacked = torch.stack([m[info.name] for m in merged]).reshape(-1, *info.shape[1:])
            past = _read(info)[info.shape[0] - tail :] if tail else stacked[:0]  # tail rows, unchanged
            return tensor_bytes(torch.cat([stacked, past.to(stacked.dtype)]).reshape(shape).to(dtype))

        return [_computed(info.name, info.data, shape, layer, fused)]

    def _fused_quantized(self, info: Stored, plan: LayerPlan, layout: ExpertTensor):
        """(data, scale) of a fused quantized tensor: unchanged experts keep their bytes, the rest is quantized."""

        def make(merged: list[Expert]) -> tuple[torch.Tensor, torch.Tensor]:
            raw = [read_tensor(part) for part in info.infos]
            parts: list[list[torch.Tensor]] = [[], []]
            for index, (cluster, expert) in enumerate(zip(plan.clusters, merged, strict=True)):
                if not plan.computes(index, layout):
                    new = [r[cluster.anchor] for r in raw]
                else:
                    new = list(quantize(info, expert[info.name][None]))
                    new = [t[0] for t in new]
                for store, tensor in zip(parts, new, strict=True):
                    store.append(tensor)
            return torch.stack(parts[0]), torch.stack(parts[1])

        return make

    def _router_output(self, stored: Stored, key: ExpertKey) -> AnyOutput:
        """Router weight rows, router bias and selection bias: anchor rows, weighted mean, or re-initialised.

        Per-expert vectors (output scales, not selection) keep the anchor's values under reinit."""
        if stored.quantized:
            raise MoePruneError(f"{stored.file}: {stored.name} is a quantized router; moe-prune expects float routers")
        info = stored.data
        plan = self.plans[key.layer]
        axis = 0 if key.kind == "rows" else -1
        count = self.counts[key.layer]
        blocks, kept = router_rows(info, key, self.adapter, count, plan.anchors)
        anchored = self._is_lockstep(info.name) or (plan.router == "reinit" and self._is_vector(info.name))
        if plan.router == "anchor" or anchored:
            return slice_expert_axis(info, axis, blocks, kept)
        _require_float(stored)
        tail = blocks - count  # rows past the experts' (Adapter.router_tail): kept as they are, after the new rows
        shape = list(info.shape)
        shape[axis] = len(plan.clusters) + tail
        dtype = _torch_dtype(info)
        is_weight = self.matcher.is_router(info.name) is not None

        def rows() -> bytes:
            original = _read(stored).movedim(axis, 0)
            if plan.router == "average":
                new = torch.stack(
                    [
                        sum(w * original[m] for m, w in zip(c.members, ws, strict=True))
                        for c, ws in zip(plan.clusters, plan.weights, strict=True)
                    ]
                )
            elif is_weight:
                generator = torch.Generator().manual_seed(plan.seed * 100_003 + key.layer)
                std = float(original[:count].std()) if original[:count].numel() > 1 else 0.02
                new = torch.randn((len(plan.clusters), *original.shape[1:]), generator=generator) * std
            else:
                new = torch.zeros((len(plan.clusters), *original.shape[1:]))
            new = torch.cat([new.to(original.dtype), original[count:]])
            return tensor_bytes(new.movedim(0, axis).to(dtype))

        return _computed(info.name, info, tuple(shape), None, rows)


__all__ = ["ROUTER_RULES", "LayerPlan", "MergePlanner", "find_layout"]
