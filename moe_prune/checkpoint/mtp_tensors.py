"""A checkpoint's multi-token-prediction tensors, split from the decoder's and named as virtual decoder layers.

The MTP layers' MoE blocks get the edit of the decoder layer they follow; renamed to layer
`num_hidden_layers + i`, they are planned by the decoder's key matcher (`surgery`) and given their
on-disk names back afterwards. Also: the router check every edit runs first, and the manifest entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from moe_prune.architectures.mtp import MtpLayer, MtpLayout
from moe_prune.architectures.spec import Adapter
from moe_prune.artifacts.manifest import Members, MtpRecord
from moe_prune.checkpoint.safetensors_io import TensorInfo
from moe_prune.checkpoint.surgery import KeyMatcher, Named
from moe_prune.errors import MoePruneError


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
