"""The output tensors of a shrunk checkpoint (prune or merge), planned from shard headers, computed one layer at a time.

One planner for both commands (issue #22): every MoE layer has a `LayerPlan`. Whatever passes through
unchanged is a byte selection of the input (`checkpoint.surgery.select_tensor`): untouched tensors,
the experts of a layer whose clusters each hold one expert (a prune), slots whose cluster is one expert,
router rows under `--router anchor`. Nothing of those is read or decoded, so a prune streams bytes.
Merged experts and averaged/re-initialised router rows are `ComputedTensor`s (`merging.layer_experts`):
a slot's cluster is read, aligned and averaged (in float32, cast back to the checkpoint's dtype) when
the writer reaches the first of that slot's computed tensors, one member at a time, and each finished
tensor is released once written.
Outputs keep the input's tensor order; a computed quantized tensor's scale follows its data.

Quantized checkpoints (FP8 with block scales, MXFP4): experts are read dequantized through
`checkpoint.quantized.read_float`, merged in float32 and written back in the checkpoint's format
with fresh scales (`quantized.quantize`), so the output keeps its quantization_config. Experts
that pass through unchanged keep their original bytes, in fused tensors too.

With a refit (`merging.refit`) every slot keeps its anchor's tensors byte for byte except the down
projection, which is the least-squares solution carried by the plan (nothing is read to compute it).
"""

from __future__ import annotations

from functools import partial

import torch

from moe_prune.architectures.spec import Adapter, ExpertTensor
from moe_prune.checkpoint.expert_slices import fused_expert
from moe_prune.checkpoint.quantized import Quantization, Stored, group, quantize
from moe_prune.checkpoint.safetensors_io import AnyOutput, OutputTensor, TensorInfo, read_tensor, tensor_bytes
from moe_prune.checkpoint.surgery import ExpertKey, KeyMatcher, check_router_layers, router_rows, select_tensor, whole
from moe_prune.errors import MoePruneError
from moe_prune.merging.layer_experts import (
    LayerExperts,
    computed,
    read_float_expert,
    requantized,
    require_float,
    torch_dtype,
)
from moe_prune.merging.layer_plan import ROUTER_RULES, LayerPlan
from moe_prune.merging.refit import check_layer, is_down


def find_layout(name: str, rows: tuple[ExpertTensor, ...]) -> ExpertTensor:
    """The adapter row whose suffix ends `name` (at a dot boundary)."""
    for row in rows:
        if name == row.suffix or name.endswith("." + row.suffix):
            return row
    raise MoePruneError(
        f"{name}: merge does not know where this expert tensor's intermediate axis is; "
        "add it to `expert_tensors` of its row in moe_prune/architectures/table.py"
    )


class ShrinkPlanner:
    """Turn shard headers plus per-layer plans into the output tensor list of a prune or merge (module docstring)."""

    def __init__(
        self,
        adapter: Adapter,
        plans: dict[int, LayerPlan],
        counts: dict[int, int],
        quant: Quantization | None = None,
        routed: set[int] | None = None,
    ) -> None:
        """`counts[layer]`: the layer's current expert count; `routed`: the layers whose routers the tensors
        must hold (default: the planned ones)."""
        self.adapter = adapter
        self.counts = {layer: counts[layer] for layer in plans}
        self.plans = plans
        self.quant = quant
        self.routed = set(plans) if routed is None else routed
        self.matcher = KeyMatcher(adapter)
        self.layers = {layer: LayerExperts(plan, self.counts[layer]) for layer, plan in plans.items()}

    def plan(self, tensors: list[TensorInfo]) -> list[AnyOutput]:
        """The output tensors, in the input's order; every check (dtypes, refit shapes) runs before any is made."""
        check_router_layers(tensors, self.matcher, self.routed)
        classified = [(info, self.matcher.classify(info.name)) for info in group(tensors, self.quant)]
        experts = [(i, k) for i, k in classified if k is not None and k.layer in self.plans and self._is_expert(i, k)]
        experts = [(i, k) for i, k in experts if not self.plans[k.layer].passthrough]  # a selection reads nothing
        for info, _ in experts:  # dtypes first: a stray scale tensor is explained by its unread weight
            require_float(info)
        for info, key in experts:
            self._collect(info, key)
        for layer in self.layers.values():
            layer.check()
            if layer.plan.refit is not None:  # biases, unknown down tensors, statistics of other shapes refused
                where = f"{tensors[0].file.parent if tensors else 'the checkpoint'}: MoE layer {layer.plan.layer}"
                if self.adapter.expert_vectors:
                    raise MoePruneError(
                        f"{where}: --refit fits the down projection without the per-expert scale that multiplies it "
                        f"({', '.join(self.adapter.expert_vectors)}); merge without --refit"
                    )
                check_layer(layer.layouts, layer.expert_shapes(), layer.plan.refit[0], where)
        place = {info.name: i for i, info in enumerate(tensors)}
        placed: list[tuple[int, AnyOutput]] = []
        for info, key in classified:
            if key is None or key.layer not in self.plans or self._selected(info, key):
                outputs = [(part, self._select(part)) for part in info.infos]
            elif self._is_expert(info, key):
                outputs = self._expert_outputs(info, key)
            else:
                outputs = [(info.data, self._router_output(info, key))]
            placed += [(place[part.name], out) for part, out in outputs if out is not None]
        return [out for _, out in sorted(placed, key=lambda item: item[0])]  # stable: a scale after its data

    def _select(self, info: TensorInfo) -> OutputTensor | None:
        """`info` as bytes of the input: whole, or (in a planned layer) the anchors' slots of it."""
        key = self.matcher.classify(info.name)
        if key is None or key.layer not in self.plans:
            return whole(info)
        return select_tensor(info, key, self.adapter, self.counts[key.layer], self.plans[key.layer].anchors)

    def _selected(self, info: Stored, key: ExpertKey) -> bool:
        """Is this tensor of a planned layer its anchors' rows as they are (no expert or router row computed)?

        Experts of a layer of one-expert clusters; router rows under `--router anchor`; a second expert set
        (`_is_lockstep`), and per-expert vectors under reinit, which keep the anchors' values."""
        plan = self.plans[key.layer]
        if self._is_expert(info, key):
            return plan.passthrough
        return (
            plan.router == "anchor"
            or self._is_lockstep(info.name)
            or (plan.router == "reinit" and self._is_vector(info.name))
        )

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
                    f"{info.file}: {info.name} names expert {key.slot} but layer {key.layer} has "
                    f"{self.counts[key.layer]}"
                )
            layer.per_expert.setdefault(key.tail, {})[key.slot] = info
            layer.layouts[key.tail] = find_layout(key.tail, self.adapter.expert_tensors)
        else:
            if info.quantized and info.data.shape[0] != self.counts[key.layer]:
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

    def _expert_outputs(self, info: Stored, key: ExpertKey) -> list[tuple[TensorInfo, AnyOutput | None]]:
        """(input part whose place the output takes, output) of an expert tensor of a layer that computes."""
        layer = self.layers[key.layer]
        plan = layer.plan
        copies = [(part, self._select(part)) for part in info.infos]
        if key.kind == "per_expert":
            assert key.slot is not None
            if key.slot >= self.counts[key.layer] or key.slot not in plan.anchors:
                return copies  # a tail expert (after the merged ones, unchanged), or a dropped one (nothing)
            index = plan.anchors.index(key.slot)
            if not plan.computes(index, layer.layouts[key.tail]):
                if plan.refit is None and any(len(c.members) > 1 for c in plan.clusters):
                    read_float_expert(info)  # a layer that averages reads every member once: NaN/Inf refused here too
                return copies
            name = key.renumbered(index)
            take = partial(layer.take, index, key.tail)
            if info.quantized:
                layer.want(index, key.tail, partial(quantize, info))
                return [(info.data, out) for out in requantized(info, info.names(name), info.shape, take)]
            dtype = torch_dtype(info.data)
            layer.want(index, key.tail, partial(torch.Tensor.to, dtype=dtype))
            return [(info.data, computed(name, info.data, info.shape, lambda: tensor_bytes(take())))]
        layout = layer.layouts[info.name]
        tail = layer.fused_tail[info.name]
        if plan.refit is not None and not is_down(layout):
            return copies
        count = len(plan.clusters)
        shape = ((info.shape[0] - tail) // self.counts[key.layer] * count + tail, *info.shape[1:])
        if info.quantized:
            made = requantized(info, info.names(info.name), shape, self._fused_quantized(info, layer, layout))
            return [(info.data, out) for out in made]
        dtype = torch_dtype(info.data)
        for index in range(count):  # every slot, one-expert clusters too (their average is the expert)
            layer.want(index, info.name, partial(torch.Tensor.to, dtype=dtype))

        def fused() -> bytes:
            """The slots' rows (and the rows past the experts', unchanged) filled into one tensor of the output."""
            out = torch.empty(shape, dtype=dtype)
            row = 0
            for index in range(count):
                part = layer.take(index, info.name).reshape(-1, *shape[1:])
                out[row : row + len(part)] = part
                row += len(part)
            if tail:
                out[row:] = layer.tail_rows(info.name)
            return tensor_bytes(out)

        return [(info.data, computed(info.name, info.data, shape, fused))]

    def _fused_quantized(self, info: Stored, layer: LayerExperts, layout: ExpertTensor):
        """(data, scale) of a fused quantized tensor: unchanged experts keep their bytes, the rest is quantized."""
        plan = layer.plan
        for index in range(len(plan.clusters)):
            if plan.computes(index, layout):
                layer.want(index, info.name, lambda merged: [t[0] for t in quantize(info, merged[None])])

        def make() -> tuple[torch.Tensor, torch.Tensor]:
            parts: list[list[torch.Tensor]] = [[], []]
            for index, cluster in enumerate(plan.clusters):
                if not plan.computes(index, layout):
                    anchor = fused_expert(info, layer.n_experts, cluster.anchor)
                    new = [read_tensor(part) for part in anchor.infos]
                else:
                    new = layer.take(index, info.name)
                for store, tensor in zip(parts, new, strict=True):
                    store.append(tensor)
            return torch.stack(parts[0]), torch.stack(parts[1])

        return make

    def _router_output(self, stored: Stored, key: ExpertKey) -> AnyOutput:
        """Router weight rows, router bias and selection bias (and per-expert vectors): weighted mean under
        `--router average`, re-initialised under reinit (`_selected` covers the rows kept as they are)."""
        if stored.quantized:
            raise MoePruneError(f"{stored.file}: {stored.name} is a quantized router; moe-prune expects float routers")
        info = stored.data
        plan = self.plans[key.layer]
        axis = 0 if key.kind == "rows" else -1
        count = self.counts[key.layer]
        blocks, _ = router_rows(info, key, self.adapter, count, plan.anchors)
        require_float(stored)
        tail = blocks - count  # rows past the experts' (Adapter.router_tail): kept as they are, after the new rows
        shape = list(info.shape)
        shape[axis] = len(plan.clusters) + tail
        dtype = torch_dtype(info)
        is_weight = self.matcher.is_router(info.name) is not None

        def rows() -> bytes:
            original = read_float_expert(stored).movedim(axis, 0)
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

        return computed(info.name, info, tuple(shape), rows)


__all__ = ["ROUTER_RULES", "LayerPlan", "ShrinkPlanner", "find_layout"]
