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
from pathlib import Path

from moe_prune.architectures import ADAPTERS
from moe_prune.architectures.config import ModelConfig
from moe_prune.architectures.mtp import DECODER_NUMBERING, mtp_layout
from moe_prune.artifacts.common import read_json
from moe_prune.checkpoint.mtp_tensors import MtpTensors
from moe_prune.checkpoint.safetensors_io import TensorInfo
from moe_prune.checkpoint.surgery import KeyMatcher
from moe_prune.checkpoint.validate_moe import MoeLayer, check_moe_layer, check_same_kinds, moe_tensors, one_expert
from moe_prune.errors import MoePruneError

INDEX_NAME = "model.safetensors.index.json"

# config.json fields that size one routed expert's intermediate layer, first present wins (Qwen, DeepSeek and
# most families: moe_intermediate_size; Mixtral, gpt-oss, Granite, Llama 4: intermediate_size).
EXPERT_WIDTH_KEYS = ("moe_intermediate_size", "intermediate_size")
# Tensors whose first axis is the vocabulary (input embeddings of every supported family, output head).
VOCAB_TENSORS = re.compile(r"^(?:.*\.)?(?:embed_tokens|wte|lm_head)\.weight$")


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
    layers = moe_tensors(config, tensors)
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
        check_moe_layer(config, layer, n_experts, layers.get(layer, MoeLayer()), where)
    check_same_kinds(config, layers, where)
    _check_mtp(config, tensors, where)


def read_weight_map(index: Path) -> dict[str, str]:
    """The index's weight_map (tensor name -> shard file name), read by the one bounded JSON reader."""
    obj, name = read_json(index, "safetensors index")
    if "weight_map" not in obj:
        raise MoePruneError(f"{name}: corrupt index (no weight_map)")
    if not isinstance(obj.get("metadata"), dict):  # transformers reads index["metadata"][...] at load
        raise MoePruneError(f"{name}: corrupt index (metadata must be an object, as transformers reads it)")
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


def _check_widths(config: ModelConfig, tensors: list[TensorInfo], layers: dict[int, MoeLayer]) -> None:
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
        found = layers.get(layer, MoeLayer())
        one = [(info, info.shape) for slots in found.per_expert.values() for info in slots.values()]
        one += [(info, one_expert(info.shape, n_experts)) for info in found.fused]
        for info, shape in one:
            row = next((r for r in config.adapter.expert_tensors if info.name.endswith("." + r.suffix)), None)
            if row is None or row.axis is None or len(shape) <= row.axis:
                continue
            if shape[row.axis] != width * row.parts:
                raise MoePruneError(
                    f"{config.source}: {key} is {width}, but the expert tensor {info.name} in {info.file} has "
                    f"shape {list(info.shape)} (intermediate size {shape[row.axis] / row.parts:g})"
                )


def _check_heads(config: ModelConfig, tensors: list[TensorInfo], layers: dict[int, MoeLayer]) -> None:
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


def _check_mtp(config: ModelConfig, tensors: list[TensorInfo], where: Path) -> None:
    """Multi-token-prediction layers: no more than the config declares, and each MoE block holding the
    experts of the last decoder MoE layer, whose output it continues (prune and merge give it that layer's
    selection): the config's one count (vLLM and SGLang size it from that field), or in a ragged checkpoint that
    layer's count (moe-prune's vLLM plugin sizes it so), with every expert's tensors.

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
    found = moe_tensors(config, split.virtual)
    count = config.experts_in_layer(config.moe_layers[-1])
    for virtual in split.moe:
        try:
            check_moe_layer(config, virtual, count, found[virtual], where)
        except MoePruneError as exc:
            layer = next(m for m in split.layers.values() if m.layer == virtual)
            message = str(exc).replace(f"MoE layer {virtual}", f"multi-token-prediction layer {layer.prefix}")
            raise MoePruneError(split.disk_name_in(message)) from exc
