"""Plan a checkpoint edit: which tensors to copy, drop, renumber or slice along the expert axis.

The plan is built from shard headers only; `writer.write_checkpoint` then streams bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TypeVar

from moe_prune.architectures.spec import Adapter
from moe_prune.checkpoint.safetensors_io import ComputedTensor, OutputTensor, TensorInfo
from moe_prune.errors import MoePruneError

Named = TypeVar("Named", TensorInfo, OutputTensor, ComputedTensor)


@dataclass(frozen=True)
class ExpertKey:
    """How one on-disk tensor relates to experts: its layer, kind and (per-expert) slot."""

    kind: str  # per_expert | rows (expert axis 0, possibly blocked) | last_axis
    layer: int
    slot: int | None = None
    stem: str = ""  # per_expert: the key up to the expert number
    tail: str = ""  # per_expert: the key after the expert number
    router: bool = False  # the router's weight, bias or selection bias (rows past the experts' may follow)

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
        whole_keys = (*adapter.expert_vectors, *adapter.lockstep)
        vectors = "".join(f"|{re.escape(v)}" for v in whole_keys)  # whole keys, expert axis first
        self._fused = re.compile(head + f"(?:(?:{fused})" + r"(?P<tail>(?!\d+\.).+)" + f"{vectors})$")
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
            return ExpertKey("rows", int(m["layer"]), router=True)
        if self._last and (m := self._last.match(name)):
            return ExpertKey("last_axis", int(m["layer"]), router=True)
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


def router_rows(
    info: TensorInfo, key: ExpertKey, adapter: Adapter, n_experts: int, slots: list[int]
) -> tuple[int, list[int]]:
    """(entries on the expert axis, entries kept) of a tensor sliced with the experts: a router tensor of a family
    whose router has rows past the experts' (`Adapter.router_tail`) keeps them after the kept experts' rows.

    The count is read off the tensor; validation checks it against the config (`ModelConfig.router_tail`).
    Where those rows are experts too (`Adapter.tail_experts`), fused expert tensors keep them the same way."""
    if not ((key.router or adapter.tail_experts) and adapter.router_tail and info.shape):
        return n_experts, slots
    extra = info.shape[0 if key.kind == "rows" else -1] - n_experts
    return n_experts + max(extra, 0), [*slots, *range(n_experts, n_experts + extra)]


def whole(info: TensorInfo, name: str | None = None) -> OutputTensor:
    return OutputTensor(name or info.name, info.dtype, info.shape, info.file, ((info.start, info.end),))


def check_router_layers(tensors: list[TensorInfo], matcher: KeyMatcher, layers: set[int]) -> None:
    """The weights' routers must sit in exactly the MoE layers the config names (`layers`)."""
    routers = {layer for t in tensors if (layer := matcher.is_router(t.name)) is not None}
    if routers != layers:
        where = tensors[0].file.parent if tensors else "the checkpoint"
        raise MoePruneError(
            f"{where}: config.json says the MoE layers are {sorted(layers)} but the weights have routers "
            f"({matcher.adapter.router}) in layers {sorted(routers)}"
        )


def select_tensor(
    info: TensorInfo, key: ExpertKey, adapter: Adapter, n_experts: int, slots: list[int]
) -> OutputTensor | None:
    """One tensor of an MoE layer keeping `slots` (current slot numbers) as slots 0..K-1, as bytes of the input.

    Per-expert tensors are renamed (None: a dropped expert's); tensors with an expert axis keep those blocks
    (and rows past the experts', `router_rows`). `n_experts` is the layer's current expert count.
    """
    if key.kind != "per_expert":
        blocks, kept = router_rows(info, key, adapter, n_experts, slots)
        return slice_expert_axis(info, 0 if key.kind == "rows" else -1, blocks, kept)
    if key.slot is None or (key.slot >= n_experts and not adapter.tail_experts):
        raise MoePruneError(f"{info.file}: {info.name} names expert {key.slot} but layer {key.layer} has {n_experts}")
    if key.slot >= n_experts:  # a tail expert (validated against the config): after the kept ones
        return whole(info, key.renumbered(len(slots) + key.slot - n_experts))
    return whole(info, key.renumbered(slots.index(key.slot))) if key.slot in slots else None
