"""Does a checkpoint's config agree with its weights? Checked from headers alone, before any stage works.

Shard headers are validated one by one in `safetensors_io.read_header`; this module checks what needs
the config and every tensor together: the decoder layers present, the vocabulary, and that every MoE
layer holds a router with one row per expert and the complete set of expert tensors the config
implies. A checkpoint that fails here would prune into a broken model, or load with a page of
transformers' mismatch report; refusing it first gives one line naming the file at fault.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from moe_prune.architectures import ADAPTERS
from moe_prune.architectures.config import ModelConfig
from moe_prune.architectures.mtp import DECODER_NUMBERING, mtp_layout
from moe_prune.artifacts.common import read_json
from moe_prune.checkpoint.safetensors_io import TensorInfo
from moe_prune.checkpoint.surgery import KeyMatcher, MtpTensors
from moe_prune.errors import MoePruneError

INDEX_NAME = "model.safetensors.index.json"

# config.json fields that size one routed expert's intermediate layer, first present wins (Qwen, DeepSeek and
# most families: moe_intermediate_size; Mixtral, gpt-oss, Granite, Llama 4: intermediate_size).
EXPERT_WIDTH_KEYS = ("moe_intermediate_size", "intermediate_size")
# Tensors whose first axis is the vocabulary (input embeddings of every supported family, output head).
VOCAB_TENSORS = re.compile(r"^(?:.*\.)?(?:embed_tokens|wte|lm_head)\.weight$")


@dataclass
class _MoeLayer:
    """The expert-count-dependent tensors of one MoE layer, as found in the headers."""

    routers: list[TensorInfo] = field(default_factory=list)  # weight [E, H]
    router_biases: list[TensorInfo] = field(default_factory=list)  # [E]
    fused: list[TensorInfo] = field(default_factory=list)  # all experts in one tensor: [E, ...] or blocked [E*I, H]
    last_axis: list[TensorInfo] = field(default_factory=list)  # selection bias: expert axis last
    lockstep: list[TensorInfo] = field(default_factory=list)  # Adapter.lockstep: [E, ...], not experts' weights
    per_expert: dict[str, dict[int, TensorInfo]] = field(default_factory=dict)  # kind -> slot -> tensor


def validate_checkpoint(config: ModelConfig, tensors: list[TensorInfo], where: Path) -> None:
    """Refuse a checkpoint whose weights disagree with its config.json or its index (one line naming the file).

    `where` is the file that lists the weights: the index of a sharded checkpoint, else its one shard.
    """
    if where.name == INDEX_NAME:
        _check_index(where, tensors)
    validate_tensors(config, tensors, where)


def validate_tensors(config: ModelConfig, tensors: list[TensorInfo], where: Path) -> None:
    """The checks of `validate_checkpoint`; `where` names the weights in messages (index or single shard)."""
    _check_layers(config, tensors, where)
    _check_vocabulary(config, tensors)
    layers = _moe_tensors(config, tensors)
    _check_widths(config, tensors, layers)
    _check_heads(config, tensors, layers)
    counts = config.experts_per_layer
    for layer, found in sorted(layers.items()):
        if layer not in counts and layer < config.num_layers and found.routers:
            raise MoePruneError(
                f"{config.source}: says the MoE layers are {_ids(sorted(counts))}, but {found.routers[0].file} "
                f"holds a router for layer {layer} ({found.routers[0].name})"
            )
    for layer, n_experts in counts.items():
        _check_moe_layer(config, layer, n_experts, layers.get(layer, _MoeLayer()), where)
    _check_same_kinds(config, layers, where)
    _check_mtp(config, tensors, where)


def read_weight_map(index: Path) -> dict[str, str]:
    """The index's weight_map (tensor name -> shard file name), read by the one bounded JSON reader."""
    obj, name = read_json(index, "safetensors index")
    if "weight_map" not in obj:
        raise MoePruneError(f"{name}: corrupt index (no weight_map)")
    weight_map = obj["weight_map"]
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise MoePruneError(f"{name}: weight_map must map tensor names to shard file names")
    return weight_map


def _check_index(index: Path, tensors: list[TensorInfo]) -> None:
    """The index's weight_map must name exactly the tensors the shards hold, each in its shard (loaders trust it)."""
    weight_map = read_weight_map(index)
    held = {info.name: info.file.name for info in tensors}
    for name, shard in weight_map.items():
        if name not in held:
            raise MoePruneError(f"{index}: weight_map lists {name}, which no shard holds")
        if Path(shard).name != held[name]:
            raise MoePruneError(f"{index}: weight_map puts {name} in {shard}, but {held[name]} holds it")
    if unlisted := sorted(held.keys() - weight_map.keys()):
        raise MoePruneError(f"{index}: weight_map does not list {unlisted[0]} (in {held[unlisted[0]]})")


def _layer_pattern(config: ModelConfig) -> re.Pattern[str]:
    prefix = re.escape(config.adapter.layer_prefix).replace(r"\{L\}", r"(?P<layer>\d+)")
    return re.compile(r"^(?P<wrapper>(?:.*\.)?)" + prefix)


def _check_layers(config: ModelConfig, tensors: list[TensorInfo], where: Path) -> None:
    """The decoder layers holding weights must be exactly 0..num_layers-1 (plus multi-token-prediction layers)."""
    pattern = _layer_pattern(config)
    matcher = KeyMatcher(config.adapter)
    by_wrapper: dict[str, set[int]] = defaultdict(set)
    router_wrappers = set()
    for info in tensors:
        if m := pattern.match(info.name):
            by_wrapper[m["wrapper"]].add(int(m["layer"]))
            if matcher.is_router(info.name) is not None:
                router_wrappers.add(m["wrapper"])
    # The decoder's layers; a vision tower under another wrapper has its own numbering.
    present = set().union(*(by_wrapper[w] for w in router_wrappers or by_wrapper))
    expected = config.num_layers
    layout = mtp_layout(config.adapter, config.text, expected)
    numbered_on = layout.family.layer_prefix == DECODER_NUMBERING  # MTP layers numbered after the decoder's
    allowed = expected + ((layout.declared or 0) if numbered_on else 0)
    key = config.adapter.layer_count_key
    if missing := sorted(set(range(expected)) - present):
        raise MoePruneError(
            f"{config.source}: {key} is {expected}, but {where} holds no weights for layer"
            f"{'s' if len(missing) > 1 else ''} {_ids(missing)}"
        )
    if beyond := sorted(layer for layer in present if layer >= allowed):
        raise MoePruneError(
            f"{config.source}: {key} is {expected}, but {where} holds weights for layer"
            f"{'s' if len(beyond) > 1 else ''} {_ids(beyond)}"
        )


def _ids(values: list[int]) -> str:
    shown = ", ".join(str(v) for v in values[:5])
    return shown + (f" ... ({len(values)} in all)" if len(values) > 5 else "")


def _check_vocabulary(config: ModelConfig, tensors: list[TensorInfo]) -> None:
    """Embedding and output head rows must equal the config's vocab_size (transformers sizes them from it)."""
    vocab = config.get("vocab_size")
    if vocab is None:
        return
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise MoePruneError(f"{config.source}: vocab_size is {vocab!r}; expected a positive integer")
    for info in tensors:
        if VOCAB_TENSORS.match(info.name) and (not info.shape or info.shape[0] != vocab):
            raise MoePruneError(
                f"{config.source}: vocab_size is {vocab}, but {info.name} in {info.file} has shape {list(info.shape)}"
            )


def _check_widths(config: ModelConfig, tensors: list[TensorInfo], layers: dict[int, _MoeLayer]) -> None:
    """hidden_size against the embedding and output head; the experts' intermediate size against the config.

    transformers sizes every layer from these fields: a checkpoint that disagrees cannot load, and its
    statistics, masks and edits would describe a model that does not exist.
    """
    hidden = config.get("hidden_size")
    if isinstance(hidden, int):
        for info in tensors:
            if VOCAB_TENSORS.match(info.name) and len(info.shape) == 2 and info.shape[1] != hidden:
                raise MoePruneError(
                    f"{config.source}: hidden_size is {hidden}, but {info.name} in {info.file} has shape "
                    f"{list(info.shape)}"
                )
    if config.adapter.model_type not in ADAPTERS:  # a derived family may name its expert width otherwise
        return
    key = next((k for k in EXPERT_WIDTH_KEYS if config.get(k) is not None), None)
    width = config.get(key) if key else None
    if not isinstance(width, int):
        return
    for layer, n_experts in config.experts_per_layer.items():
        found = layers.get(layer, _MoeLayer())
        one = [(info, info.shape) for slots in found.per_expert.values() for info in slots.values()]
        one += [(info, _one_expert(info.shape, n_experts)) for info in found.fused]
        for info, shape in one:
            row = next((r for r in config.adapter.expert_tensors if info.name.endswith("." + r.suffix)), None)
            if row is None or row.axis is None or len(shape) <= row.axis:
                continue
            if shape[row.axis] != width * row.parts:
                raise MoePruneError(
                    f"{config.source}: {key} is {width}, but the expert tensor {info.name} in {info.file} has "
                    f"shape {list(info.shape)} (intermediate size {shape[row.axis] / row.parts:g})"
                )


def _check_heads(config: ModelConfig, tensors: list[TensorInfo], layers: dict[int, _MoeLayer]) -> None:
    """Key and value projections of the MoE layers: num_key_value_heads x head_dim rows, as transformers sizes them.

    Only where cheap and unambiguous: families of the table (a derived family may size some layers from
    other fields, e.g. MiMo's sliding-window heads), plain `self_attn.k_proj` / `v_proj` beside a router
    (MLA, fused QKV and linear-attention layers have none); head_dim is the config's, else
    hidden_size // num_attention_heads.
    """
    heads, kv, hidden = (config.get(k) for k in ("num_attention_heads", "num_key_value_heads", "hidden_size"))
    if config.adapter.model_type not in ADAPTERS or not all(isinstance(v, int) and v > 0 for v in (heads, kv, hidden)):
        return
    head_dim = config.get("head_dim")
    head_dim = head_dim if isinstance(head_dim, int) and head_dim > 0 else hidden // heads
    by_name = {info.name: info for info in tensors}
    pattern = _layer_pattern(config)
    for layer in config.experts_per_layer:
        found = layers.get(layer)
        match = pattern.match(found.routers[0].name) if found and found.routers else None
        for proj in ("k_proj", "v_proj") if match else ():
            info = by_name.get(f"{match.group(0)}self_attn.{proj}.weight")
            if info is not None and len(info.shape) == 2 and info.shape[0] != kv * head_dim:
                raise MoePruneError(
                    f"{config.source}: num_key_value_heads {kv} x head_dim {head_dim} is {kv * head_dim}, but "
                    f"{info.name} in {info.file} has shape {list(info.shape)}"
                )


def _one_expert(shape: tuple[int, ...], n_experts: int) -> tuple[int, ...]:
    """One expert's shape in a fused tensor: `[E, ...]` without E, or one of E row blocks (dbrx's `[E*I, H]`)."""
    if not shape or shape[0] == n_experts:
        return shape[1:]
    return (shape[0] // n_experts, *shape[1:])


def _moe_tensors(config: ModelConfig, tensors: list[TensorInfo]) -> dict[int, _MoeLayer]:
    """Every tensor that depends on the expert count, grouped by layer (any layer, MoE or not)."""
    matcher = KeyMatcher(config.adapter)
    bias = config.adapter.router_bias
    layers: dict[int, _MoeLayer] = defaultdict(_MoeLayer)
    for info in tensors:
        key = matcher.classify(info.name)
        if key is None:
            continue
        found = layers[key.layer]
        if matcher.is_router(info.name) is not None:
            found.routers.append(info)
        elif key.kind == "per_expert":
            assert key.slot is not None
            kind = _kind(key.stem, key.layer, config) + "{E}." + key.tail
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


def _kind(name: str, layer: int, config: ModelConfig) -> str:
    """A tensor name with its layer index replaced by `{L}`: the same kind of tensor in every layer."""
    prefix = config.adapter.layer_prefix
    return name.replace(prefix.replace("{L}", str(layer)), prefix, 1)


def _check_moe_layer(config: ModelConfig, layer: int, n_experts: int, found: _MoeLayer, where: Path) -> None:
    """One router with a row per expert, expert axes of the right length, every expert's every tensor."""
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
    tail_experts = tail if adapter.tail_experts else 0  # tail rows the experts hold too (longcat's zero experts)
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
    if not found.per_expert and not found.fused:
        raise MoePruneError(f"{where}: MoE layer {layer} holds no routed-expert weights")
    for kind, slots in sorted(found.per_expert.items()):
        if extra := sorted(slot for slot in slots if slot >= n_experts + tail_experts):
            info = slots[extra[0]]
            raise MoePruneError(
                f"{config.source}: says MoE layer {layer} has {n_experts} routed experts, but {info.file} "
                f"holds {info.name}"
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


def _check_same_kinds(config: ModelConfig, layers: dict[int, _MoeLayer], where: Path) -> None:
    """Every MoE layer holds the same kinds of expert weight (a layer cannot lack, say, every expert's w2)."""
    suffixes = tuple(row.suffix for row in config.adapter.expert_tensors)

    def weights(layer: int) -> set[str]:
        found = layers.get(layer, _MoeLayer())
        fused = {_kind(info.name, layer, config) for info in found.fused if info.name.endswith(suffixes)}
        return fused | {kind for kind in found.per_expert if kind.endswith(suffixes)}

    moe = config.moe_layers
    union = set().union(*(weights(layer) for layer in moe))
    for layer in moe:
        if missing := sorted(union - weights(layer)):
            name = missing[0].replace("{L}", str(layer)).replace("{E}", "*")
            raise MoePruneError(f"{where}: MoE layer {layer} lacks {name}, which the other MoE layers hold")


def _check_mtp(config: ModelConfig, tensors: list[TensorInfo], where: Path) -> None:
    """Multi-token-prediction layers: no more than the config declares, and each MoE block holding the
    config's expert count (vLLM and SGLang size it from that one field) with every expert's tensors.

    They are checked as the virtual decoder layer `num_hidden_layers + i`, never as one of the decoder's
    MoE layers; messages name their on-disk keys.
    """
    layout = mtp_layout(config.adapter, config.text, config.num_layers)
    split = MtpTensors.split(tensors, layout)
    declared = layout.declared_layers
    if declared is not None and (beyond := sorted(i for i in split.layers if i >= declared)):
        prefix = split.layers[beyond[0]].prefix
        per_step = f" steps of {layout.step_layers} layers" if layout.step_layers > 1 else ""
        raise MoePruneError(
            f"{config.source}: {layout.family.count_key} is {layout.declared}{per_step}, but {where} holds weights "
            f"for multi-token-prediction layer {beyond[0]} ({prefix}*)"
        )
    found = _moe_tensors(config, split.virtual)
    for virtual in split.moe:
        try:
            _check_moe_layer(config, virtual, config.num_experts, found[virtual], where)
        except MoePruneError as exc:
            layer = next(m for m in split.layers.values() if m.layer == virtual)
            message = str(exc).replace(f"MoE layer {virtual}", f"multi-token-prediction layer {layer.prefix}")
            raise MoePruneError(split.disk_name_in(message)) from exc
