"""Plan a checkpoint edit: which tensors to copy, drop, renumber or slice along the expert axis.

The plan is built from shard headers only; `writer.write_checkpoint` then streams bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import TypeVar

from moe_prune.architectures.mtp import MtpLayer, MtpLayout
from moe_prune.architectures.spec import Adapter
from moe_prune.artifacts.manifest import Members, MtpRecord
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


@dataclass
class MtpTensors:
    """A checkpoint's tensors split into the decoder's and its multi-token-prediction layers'.

    MTP layer tensors are renamed to their virtual decoder layer (`num_hidden_layers + i`), so the
    decoder's key matcher and planners classify them; `restore` gives outputs their on-disk names back.
    """

    layout: MtpLayout
    decoder: list[TensorInfo] = field(default_factory=list)  # everything that is not MTP
    virtual: list[TensorInfo] = field(default_factory=list)  # MTP layer tensors, virtual names
    extras: list[TensorInfo] = field(default_factory=list)  # MTP tensors outside the layers
    layers: dict[int, MtpLayer] = field(default_factory=dict)  # index -> layer, for layers holding tensors
    moe: list[int] = field(default_factory=list)  # virtual layer numbers holding a router
    unplaced: list[TensorInfo] = field(default_factory=list)  # extras naming experts or a router: drop-only
    _renames: dict[str, str] = field(default_factory=dict)  # wrapper + virtual prefix -> wrapper + disk prefix

    @classmethod
    def split(cls, tensors: list[TensorInfo], layout: MtpLayout) -> MtpTensors:
        out = cls(layout)
        matcher = KeyMatcher(layout.adapter)
        for info in tensors:
            found = layout.locate(info.name)
            if found is None:
                if layout.is_extra(info.name):  # the family's MTP tensors, which transformers skips on load
                    out.extras.append(info)
                    if _names_moe(info.name, layout.adapter):
                        out.unplaced.append(info)
                elif layout.looks_mtp(info.name):
                    raise unplaced_error(info, layout)
                else:
                    out.decoder.append(info)
                continue
            layer, wrapper = found
            out.layers[layer.index] = layer
            virtual, disk = wrapper + layer.virtual, wrapper + layer.prefix
            out._renames[virtual] = disk
            named = replace(info, name=virtual + info.name[len(disk) :])
            if matcher.classify(named.name) is None and _names_moe(info.name[len(disk) :], layout.adapter):
                raise unplaced_error(info, layout)  # expert tensors the decoder's key layout does not describe
            out.virtual.append(named)
            if matcher.is_router(named.name) is not None and layer.layer not in out.moe:
                out.moe.append(layer.layer)
        out.moe.sort()
        return out

    @property
    def steps(self) -> int:
        """MTP layers as the config counts them (Nemotron-H: a step of several numbered layers counts once)."""
        return -(-len(self.layers) // self.layout.step_layers)

    @property
    def present(self) -> bool:
        return bool(self.virtual or self.extras)

    def disk_name(self, name: str) -> str:
        """The on-disk name of a (virtual) MTP tensor name."""
        for virtual, disk in self._renames.items():
            if name.startswith(virtual):
                return disk + name[len(virtual) :]
        return name

    def disk_name_in(self, text: str) -> str:
        """`text` (a message) with every virtual MTP tensor name replaced by its on-disk name."""
        for virtual, disk in self._renames.items():
            text = text.replace(virtual, disk)
        return text

    def restore(self, outputs: list[Named]) -> list[Named]:
        """Outputs planned under virtual names, renamed to the MTP layers' on-disk keys."""
        return [replace(t, name=self.disk_name(t.name)) for t in outputs]

    def prefixes(self) -> dict[int, str]:
        """On-disk prefix of each MTP layer holding an MoE block, keyed by MTP index."""
        return {layer.index: layer.prefix for layer in self.layers.values() if layer.layer in self.moe}

    def notes(self, follow: int, dropped: bool, verb: str) -> list[str]:
        """One line per MTP MoE block (one in all when dropped), for the CLI, its JSON and the manifest history."""
        if dropped:
            return [
                f"--drop-mtp: removed {self.steps} multi-token-prediction layer(s) "
                f"({len(self.virtual) + len(self.extras)} tensors), {self.layout.family.count_key} set to 0"
            ]
        return [
            f"multi-token-prediction layer {prefix}: experts of layer {follow} {verb}"
            for prefix in self.prefixes().values()
        ]


def _names_moe(name: str, adapter: Adapter) -> bool:
    """Does `name` mention a router or routed experts (keys whose size follows the expert count)?"""
    memory = adapter.memory_layout()
    parts = {adapter.experts, memory.experts, adapter.router, memory.router, *adapter.fused_experts}
    return any(f".{part}" in f".{name}" for part in parts if part)


def unplaced_error(info: TensorInfo, layout: MtpLayout, hint: str = "") -> MoePruneError:
    return MoePruneError(
        f"{info.file}: holds {info.name}, a multi-token-prediction tensor moe-prune cannot place "
        f"({layout.describe()}); refusing rather than copying it unedited next to edited experts{hint}"
    )


def check_routers_finite(split: MtpTensors, adapter: Adapter, verb: str, mtp: bool = True) -> None:
    """Read every router weight, router bias and selection bias ([E, H] a layer at most) and refuse NaN or Inf.

    prune and merge copy most bytes unread (kept experts, attention, embeddings); the router is what
    they cut in every MoE layer, and a router that is not finite routes every token nowhere.
    Multi-token-prediction routers are read unless `mtp` is False (the layers are dropped).
    """
    from moe_prune.checkpoint.quantized import Stored, read_expert_tensor  # torch: only when routers are read
    from moe_prune.checkpoint.safetensors_io import FLOAT_DTYPES

    groups = [(KeyMatcher(adapter), split.decoder)]
    if mtp:
        groups.append((KeyMatcher(split.layout.adapter), split.virtual))
    for matcher, tensors in groups:
        bias = matcher.adapter.router_bias
        for info in tensors:
            key = matcher.classify(info.name)
            if key is None or key.kind == "per_expert" or info.dtype not in FLOAT_DTYPES:
                continue  # quantized routers are refused where they are cut (merge) or copied as bytes
            routing = matcher.is_router(info.name) is not None or key.kind == "last_axis"
            if routing or (bias and info.name.endswith(bias)):
                read_expert_tensor(Stored(split.disk_name(info.name), info), f"refusing to {verb} a broken router")


def mtp_records(
    split: MtpTensors, follow: int, slots: tuple[int, ...], members: tuple[Members, ...] | None
) -> dict[int, MtpRecord]:
    """Manifest entries of the MTP MoE blocks after they got layer `follow`'s edit."""
    return {index: MtpRecord(prefix, follow, slots, members) for index, prefix in split.prefixes().items()}
