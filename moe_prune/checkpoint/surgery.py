"""Plan a checkpoint edit: which tensors to copy, drop, renumber or slice along the expert axis.

The plan is built from shard headers only; `writer.write_checkpoint` then streams bytes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from moe_prune.architectures.spec import Adapter
from moe_prune.checkpoint.safetensors_io import OutputTensor, TensorInfo
from moe_prune.errors import MoePruneError


@dataclass(frozen=True)
class ExpertKey:
    """How one on-disk tensor relates to experts: its layer, kind and (per-expert) slot."""

    kind: str  # per_expert | rows (expert axis 0, possibly blocked) | last_axis
    layer: int
    slot: int | None = None
    stem: str = ""  # per_expert: the key up to the expert number
    tail: str = ""  # per_expert: the key after the expert number

    def renumbered(self, slot: int) -> str:
        return f"{self.stem}{slot}.{self.tail}"


class _LayoutMatcher:
    """Classify safetensors keys with one key layout of an adapter, whatever prefix wraps them."""

    def __init__(self, adapter: Adapter) -> None:
        layer = re.escape(adapter.layer_prefix).replace(r"\{L\}", r"(?P<layer>\d+)")
        head = r"^(?:.*\.)?" + layer
        self._per_expert = re.compile(
            r"^(?P<stem>(?:.*\.)?" + layer + re.escape(adapter.experts) + r")(?P<slot>\d+)\.(?P<tail>.+)$"
        )
        fused = "|".join(re.escape(p) for p in (adapter.experts, *adapter.fused_experts))
        self._fused = re.compile(head + f"(?:{fused})" + r"(?P<tail>(?!\d+\.).+)$")
        rows = [adapter.router] + ([adapter.router_bias] if adapter.router_bias else [])
        self._rows = re.compile(head + "(?:" + "|".join(re.escape(k) for k in rows) + ")$")
        self._router = re.compile(head + re.escape(adapter.router) + "$")
        last = adapter.selection_bias
        self._last = re.compile(head + re.escape(last) + "$") if last else None

    def classify(self, name: str) -> ExpertKey | None:
        """None for tensors that do not depend on the expert count (attention, norms, shared experts...)."""
        if m := self._per_expert.match(name):
            return ExpertKey("per_expert", int(m["layer"]), int(m["slot"]), m["stem"], m["tail"])
        if m := self._rows.match(name):
            return ExpertKey("rows", int(m["layer"]))
        if self._last and (m := self._last.match(name)):
            return ExpertKey("last_axis", int(m["layer"]))
        if m := self._fused.match(name):
            return ExpertKey("rows", int(m["layer"]))
        return None

    def is_router(self, name: str) -> int | None:
        """The layer index if `name` is a router weight."""
        m = self._router.match(name)
        return int(m["layer"]) if m else None


class KeyMatcher:
    """Both key layouts of a family: transformers' legacy names and its in-memory (fused) names.

    A checkpoint may use either (`save_pretrained(..., save_original_format=False)` writes the
    second); the two never classify the same key differently, so the first match wins.
    """

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        self._layouts = (_LayoutMatcher(adapter), _LayoutMatcher(adapter.memory_layout()))

    def classify(self, name: str) -> ExpertKey | None:
        for layout in self._layouts:
            if (key := layout.classify(name)) is not None:
                return key
        return None

    def is_router(self, name: str) -> int | None:
        for layout in self._layouts:
            if (layer := layout.is_router(name)) is not None:
                return layer
        return None


def _merge(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    merged: list[tuple[int, int]] = []
    for start, end in ranges:
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return tuple(merged)


def slice_expert_axis(info: TensorInfo, axis: int, n_experts: int, keep_slots: list[int]) -> OutputTensor:
    """Keep `keep_slots` along `axis`, where that axis holds `n_experts` equal blocks (dbrx: E*I rows)."""
    if not info.shape:
        raise MoePruneError(f"{info.file}: {info.name} is a scalar, expected an expert axis")
    axis = axis % len(info.shape)
    if info.shape[axis] % n_experts:
        raise MoePruneError(
            f"{info.file}: {info.name} has {info.shape[axis]} entries on its expert axis, "
            f"not a multiple of {n_experts} experts"
        )
    outer = math.prod(info.shape[:axis])
    if outer == 0 or info.nbytes % (outer * n_experts):
        raise MoePruneError(f"{info.file}: {info.name} byte size does not split into {n_experts} experts")
    block = info.nbytes // (outer * n_experts)
    ranges = [
        (info.start + (o * n_experts + s) * block, info.start + (o * n_experts + s + 1) * block)
        for o in range(outer)
        for s in keep_slots
    ]
    shape = list(info.shape)
    shape[axis] = info.shape[axis] // n_experts * len(keep_slots)
    return OutputTensor(info.name, info.dtype, tuple(shape), info.file, _merge(ranges))


def whole(info: TensorInfo, name: str | None = None) -> OutputTensor:
    return OutputTensor(name or info.name, info.dtype, info.shape, info.file, ((info.start, info.end),))


def plan_expert_selection(
    tensors: list[TensorInfo], adapter: Adapter, n_experts: int | Mapping[int, int], keep_slots: dict[int, list[int]]
) -> list[OutputTensor]:
    """Output tensors keeping `keep_slots[layer]` (current slot numbers) and renumbering them 0..K-1.

    `n_experts` is the current expert count of every MoE layer, or a per-layer mapping (ragged checkpoints).
    """
    counts = n_experts if isinstance(n_experts, Mapping) else dict.fromkeys(keep_slots, n_experts)
    matcher = KeyMatcher(adapter)
    routers = {layer for t in tensors if (layer := matcher.is_router(t.name)) is not None}
    if routers != set(keep_slots):
        where = tensors[0].file.parent if tensors else "the checkpoint"
        raise MoePruneError(
            f"{where}: config.json says the MoE layers are {sorted(keep_slots)} but the weights have routers "
            f"({adapter.router}) in layers {sorted(routers)}"
        )
    out: list[OutputTensor] = []
    for info in tensors:
        key = matcher.classify(info.name)
        if key is None or key.layer not in keep_slots:
            out.append(whole(info))
            continue
        slots = keep_slots[key.layer]
        layer_experts = counts[key.layer]
        if key.kind == "per_expert":
            if key.slot is None or key.slot >= layer_experts:
                raise MoePruneError(
                    f"{info.file}: {info.name} names expert {key.slot} but layer {key.layer} has {layer_experts}"
                )
            if key.slot in slots:
                out.append(whole(info, key.renumbered(slots.index(key.slot))))
        else:
            out.append(slice_expert_axis(info, 0 if key.kind == "rows" else -1, layer_experts, slots))
    return out
