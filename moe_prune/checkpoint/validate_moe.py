"""The MoE layers of a checkpoint against its config, from headers alone (part of `validate`).

Every tensor whose shape depends on the expert count is grouped by layer (`moe_tensors`); each MoE
layer must then hold one router with a row per expert (plus the router's tail rows), expert axes of
that length, and every expert's every tensor, with the same kinds of expert weight in every layer.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from moe_prune.architectures.config import ModelConfig
from moe_prune.checkpoint.safetensors_io import TensorInfo
from moe_prune.checkpoint.surgery import KeyMatcher
from moe_prune.errors import MoePruneError


@dataclass
class MoeLayer:
    """The expert-count-dependent tensors of one MoE layer, as found in the headers."""

    routers: list[TensorInfo] = field(default_factory=list)  # weight [E, H]
    router_biases: list[TensorInfo] = field(default_factory=list)  # [E]
    fused: list[TensorInfo] = field(default_factory=list)  # all experts in one tensor: [E, ...] or blocked [E*I, H]
    last_axis: list[TensorInfo] = field(default_factory=list)  # selection bias: expert axis last
    lockstep: list[TensorInfo] = field(default_factory=list)  # Adapter.lockstep: [E, ...], not experts' weights
    per_expert: dict[str, dict[int, TensorInfo]] = field(default_factory=dict)  # kind -> slot -> tensor


def moe_tensors(config: ModelConfig, tensors: list[TensorInfo]) -> dict[int, MoeLayer]:
    """Every tensor that depends on the expert count, grouped by layer (any layer, MoE or not)."""
    matcher = KeyMatcher(config.adapter)
    bias = config.adapter.router_bias
    layers: dict[int, MoeLayer] = defaultdict(MoeLayer)
    for info in tensors:
        key = matcher.classify(info.name)
        if key is None:
            continue
        found = layers[key.layer]
        if matcher.is_router(info.name) is not None:
            found.routers.append(info)
        elif key.kind == "per_expert":
            assert key.slot is not None
            kind = tensor_kind(key.stem, key.layer, config) + "{E}." + key.tail
            found.per_expert.setdefault(kind, {})[key.slot] = info
        elif key.kind == "last_axis":
            found.last_axis.append(info)
        elif bias and info.name.endswith(bias):
            found.router_biases.append(info)
        elif info.name.endswith(tuple("." + key for key in config.adapter.lockstep)):
            found.lockstep.append(info)
        else:
            found.fused.append(info)
    return layers


def tensor_kind(name: str, layer: int, config: ModelConfig) -> str:
    """A tensor name with its layer index replaced by `{L}`: the same kind of tensor in every layer."""
    prefix = config.adapter.layer_prefix
    return name.replace(prefix.replace("{L}", str(layer)), prefix, 1)


def one_expert(shape: tuple[int, ...], n_experts: int) -> tuple[int, ...]:
    """One expert's shape in a fused tensor: `[E, ...]` without E, or one of E row blocks (dbrx's `[E*I, H]`)."""
    if not shape or shape[0] == n_experts:
        return shape[1:]
    return (shape[0] // n_experts, *shape[1:])


def check_moe_layer(config: ModelConfig, layer: int, n_experts: int, found: MoeLayer, where: Path) -> None:
    """One router with a row per expert, expert axes of the right length, every expert's every tensor."""
    _check_routers(config, layer, n_experts, found, where)
    tail_experts = config.router_tail if config.adapter.tail_experts else 0  # longcat's zero experts: rows and weights
    _check_expert_axes(config, layer, n_experts, tail_experts, found)
    if not found.per_expert and not found.fused:
        raise MoePruneError(f"{where}: MoE layer {layer} holds no routed-expert weights")
    for kind, slots in sorted(found.per_expert.items()):
        _check_slots(config, layer, n_experts, tail_experts, kind, slots, where)


def _check_routers(config: ModelConfig, layer: int, n_experts: int, found: MoeLayer, where: Path) -> None:
    """A router weight (and bias) with one row per expert plus the router's tail rows, [rows, hidden] wide."""
    adapter = config.adapter
    if not found.routers:
        raise MoePruneError(
            f"{where}: MoE layer {layer} has no router weight ({adapter.layer_prefix.format(L=layer)}{adapter.router})"
        )
    tail = config.router_tail  # rows past the experts' (inkling_text: one per shared expert)
    rows = n_experts + tail
    past = f" and {tail} router rows after them ({config.adapter.router_tail})" if tail else ""
    for info in found.routers + found.router_biases:
        if not info.shape or info.shape[0] != rows:
            raise MoePruneError(
                f"{config.source}: says MoE layer {layer} has {n_experts} routed experts{past}, but its router "
                f"{info.name} in {info.file} has shape {list(info.shape)}"
            )
    hidden = config.get(adapter.router_width_key)
    for info in found.routers:
        if isinstance(hidden, int) and (len(info.shape) != 2 or info.shape[1] != hidden):
            raise MoePruneError(
                f"{info.file}: router {info.name} has shape {list(info.shape)}, not [{rows}, {hidden}] "
                f"as {config.source} implies"
            )


def _check_expert_axes(config: ModelConfig, layer: int, n_experts: int, tail_experts: int, found: MoeLayer) -> None:
    """Fused expert tensors, selection biases and lockstep tensors: an expert axis of the config's length."""
    rows = n_experts + config.router_tail
    for info in found.fused:
        if not info.shape or (info.shape[0] % n_experts and info.shape[0] != n_experts + tail_experts):
            raise MoePruneError(
                f"{info.file}: {info.name} has shape {list(info.shape)}, which does not split into the "
                f"{n_experts} experts {config.source} gives MoE layer {layer}"
            )
    for info in found.last_axis:  # a selection bias: its router's rows past the experts', or none of them
        if not info.shape or info.shape[-1] not in (n_experts, rows):
            raise MoePruneError(
                f"{info.file}: {info.name} has shape {list(info.shape)}, not one entry per each of the "
                f"{n_experts} experts {config.source} gives MoE layer {layer}"
            )
    for info in found.lockstep:  # a second expert set the count sizes too (jetmoe's attention experts)
        if not info.shape or info.shape[0] != n_experts:
            raise MoePruneError(
                f"{info.file}: {info.name} has shape {list(info.shape)}, not one row per each of the {n_experts} "
                f"experts {config.source} gives MoE layer {layer}"
            )


def _check_slots(
    config: ModelConfig,
    layer: int,
    n_experts: int,
    tail_experts: int,
    kind: str,
    slots: dict[int, TensorInfo],
    where: Path,
) -> None:
    """One kind of per-expert tensor: every expert holds it, no expert past the count, all of one shape."""
    if extra := sorted(slot for slot in slots if slot >= n_experts + tail_experts):
        info = slots[extra[0]]
        raise MoePruneError(
            f"{config.source}: says MoE layer {layer} has {n_experts} routed experts, but {info.file} holds {info.name}"
        )
    first = slots[min(slots)]  # shapes must match (dtypes may differ: loaders cast, surgery copies bytes)
    for info in slots.values():
        if info.shape != first.shape:
            raise MoePruneError(
                f"{info.file}: {info.name} has shape {list(info.shape)}, but {first.name} has "
                f"{list(first.shape)}; the experts of a layer must match"
            )
    past = set(range(n_experts, n_experts + tail_experts))
    if (held := set(slots) & past) and (gap := sorted(past - held)):  # renumbering would close the gap
        raise MoePruneError(
            f"{where}: holds {len(held)} of the {tail_experts} zero experts' {kind} past the {n_experts} routed "
            f"experts of MoE layer {layer}, not expert {gap[0]}"
        )
    if missing := sorted(set(range(n_experts)) - set(slots)):
        name = kind.replace("{L}", str(layer)).replace("{E}", str(missing[0]))
        raise MoePruneError(
            f"{where}: lacks {name} (expert {missing[0]} of the {n_experts} {config.source} gives MoE "
            f"layer {layer}{f'; {len(missing)} experts miss it' if len(missing) > 1 else ''})"
        )


def check_same_kinds(config: ModelConfig, layers: dict[int, MoeLayer], where: Path) -> None:
    """Every MoE layer holds the same kinds of expert weight (a layer cannot lack, say, every expert's w2)."""
    suffixes = tuple(row.suffix for row in config.adapter.expert_tensors)

    def weights(layer: int) -> set[str]:
        found = layers.get(layer, MoeLayer())
        fused = {tensor_kind(info.name, layer, config) for info in found.fused if info.name.endswith(suffixes)}
        return fused | {kind for kind in found.per_expert if kind.endswith(suffixes)}

    moe = config.moe_layers
    union = set().union(*(weights(layer) for layer in moe))
    for layer in moe:
        if missing := sorted(union - weights(layer)):
            name = missing[0].replace("{L}", str(layer)).replace("{E}", "*")
            raise MoePruneError(f"{where}: MoE layer {layer} lacks {name}, which the other MoE layers hold")
