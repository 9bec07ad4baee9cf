"""Tiny configs: a model type's config class defaults with sizes and counts shrunk generically.

The derivation (`derive.py`) reads structure, keys and routing off a tiny model built from this
config, so that no family needs a hand-written tiny config; what a value sizes is read from its name.
"""

from __future__ import annotations

import inspect
import itertools
import re
from typing import Any

from moe_prune.architectures.derive_models import DerivationError, config_class

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layers", "num_layers")
TOP_K_NAMES = (
    "num_experts_per_tok",
    "moe_k",
    "moe_topk",
    "moe_top_k",
    "top_k",
    "top_k_experts",
    "num_selected_experts",
)
TINY_EXPERTS, TINY_TOP_K, TINY_LAYERS, TINY_HIDDEN, TINY_FFN, TINY_MOE_FFN = 8, 2, 4, 32, 48, 24
EXPERT_COUNT_NAMES = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
UNSET_DEFAULTS = {
    **dict.fromkeys(EXPERT_COUNT_NAMES, TINY_EXPERTS),
    **dict.fromkeys(TOP_K_NAMES, TINY_TOP_K),
    "moe_intermediate_size": TINY_MOE_FFN,
    # optional sparse-attention indexers left unset by the defaults (all or none must be given)
    "indexer_n_heads": 2,
    "indexer_kv_heads": 1,
    "indexer_head_dim": 16,
    "indexer_budget": 8,
    "indexer_compress_ratio": 2,
}
# Switches that leave the MoE block out of the defaults (gemma4_text): a tiny model is built with it on.
MOE_SWITCH = re.compile(r"^(enable|use)_moe(_block)?$")


def _shrunk_value(key: str, value: Any, n_layers: int | None) -> Any:
    """A small stand-in for one config value, by what its name says it sizes; the value itself if unknown."""
    if value is None:
        return UNSET_DEFAULTS.get(key)
    if isinstance(value, bool) and MOE_SWITCH.match(key):
        return True
    if key.endswith("token_id"):
        return [v % 128 for v in value] if isinstance(value, list) else value % 128 if isinstance(value, int) else value
    if isinstance(value, bool) or not isinstance(value, int | list | str):
        return value
    if n_layers and _layer_indices(key, value, n_layers):  # e.g. llama4's moe_layers: renumbered onto kept layers
        kept = _kept_layers(n_layers)
        return [new for new, old in enumerate(kept) if old in value]
    per_layer = isinstance(value, list) or (isinstance(value, str) and "pattern" in key)
    if per_layer and n_layers and len(value) == n_layers and n_layers > TINY_LAYERS:
        # the first layer and the last ones: leading dense layers and periodic full-attention layers both stay
        return value[:1] + value[1 - TINY_LAYERS :]
    if not isinstance(value, int):
        return value
    k = key.lower()
    if k in LAYER_COUNT_KEYS:
        return min(value, TINY_LAYERS)
    if k in ("hidden_size", "d_model", "n_embd"):
        return TINY_HIDDEN
    if k.startswith("vocab_size"):  # vocab_size_per_layer_input (gemma4) too
        return 128
    if k.startswith("hidden_size_") and value > 16:  # per-layer input embeddings (gemma4); no [E, H] look-alike
        return 4
    if "intermediate_size" in k or "ffn_hidden_size" in k or k in ("ffn_dim", "moe_ffn_dim"):
        return value if value <= 0 else (TINY_MOE_FFN if ("moe" in k or "expert" in k) else TINY_FFN)
    if "shared" in k and "expert" in k:
        return min(value, 1)
    if "expert" in k and "per_tok" not in k and value > TINY_EXPERTS:
        return TINY_EXPERTS
    if k in TOP_K_NAMES:
        return min(value, TINY_TOP_K)
    return _shrunk_shape_value(k, value)


def _layer_indices(key: str, value: Any, n_layers: int) -> bool:
    """A list of layer indices (strictly increasing, within the layers), not one value per layer (0/1 flags)."""
    ints = isinstance(value, list) and len(value) > 1 and all(isinstance(v, int) for v in value)
    return ints and "layer" in key and all(0 <= a < b < n_layers for a, b in itertools.pairwise(value))


def _shrunk_shape_value(k: str, value: int) -> int:
    """Heads, head dims, ranks and group counts of a tiny model."""
    if "heads" in k:
        return min(value, 2 if ("key_value" in k or "kv" in k or "key" in k) else 4)
    if k == "n_group":
        return min(value, 2)
    if k == "n_groups":  # Mamba B/C groups: must divide the (shrunk) heads
        return min(value, 1)
    if k == "topk_group":
        return min(value, 1)
    if k in ("first_k_dense_replace", "num_dense_layers", "moe_layer_start_index"):
        return min(value, 1)
    if k in ("max_position_embeddings", "max_seq_len"):
        return min(value, 256)
    if ("dim" in k or "rank" in k) and "window" not in k and value > 16:
        return 8 if "head" in k or "rope" in k or "nope" in k else 16
    return value


def shrink_config(model_type: str, overrides: dict[str, Any] | None = None):
    """A tiny config of `model_type`: its class defaults with sizes and counts shrunk generically.

    A wrapper's sub-configs (text_config, vision_config, ...) are shrunk as configs of their own (their own
    layer counts and per-layer lists); `overrides` apply to the top level."""
    cls = config_class(model_type)
    defaults = cls().to_dict()
    small = _shrunk_config_dict(defaults, cls)
    _keep_width_ties(defaults, small)
    small["tie_word_embeddings"] = False
    small.update(overrides or {})
    return cls.from_dict(_fit_layer_lists(small, overrides or {}))


# Adapter widths between sub-models: adapter_in_dim, adapter_out_dim, adapter_input_size, conv_output_size.
WIDTH_TIE = re.compile(r"_(in|out|input|output)_(dim|size)$")


def _keep_width_ties(defaults: dict[str, Any], small: dict[str, Any]) -> None:
    """A sub-config's in/out widths that equal a hidden size (its own, else the text model's) take that size's
    shrunk value: the shrink keeps the ties a wrapper validates (dots3_note: the vision adapter_in_dim is the
    vision hidden_size, the vision and audio adapter_out_dim the text hidden_size)."""
    text = defaults.get("text_config") if isinstance(defaults.get("text_config"), dict) else {}
    small_text = small.get("text_config") if isinstance(small.get("text_config"), dict) else {}
    for key, sub in defaults.items():
        if not (isinstance(sub, dict) and isinstance(sub.get("model_type"), str) and isinstance(small.get(key), dict)):
            continue
        sizes = (
            (sub.get("hidden_size"), small[key].get("hidden_size")),
            (text.get("hidden_size"), small_text.get("hidden_size")),
        )
        for name, value in sub.items():
            tied = [new for old, new in sizes if WIDTH_TIE.search(name) and isinstance(value, int) and value == old]
            if tied and isinstance(tied[0], int):
                small[key][name] = tied[0]


def _shrunk_config_dict(defaults: dict[str, Any], cls: type | None) -> dict[str, Any]:
    """One config's values shrunk: fields of `cls` (values computed in __post_init__ follow) or, for a
    sub-config without a registered class, every key."""
    n_layers = _layer_count(defaults)
    aliases = getattr(cls, "attribute_map", {}) if cls else {}  # how some configs name their fields
    fields = set(inspect.signature(cls.__init__).parameters) | set(aliases) | set(aliases.values()) if cls else None
    named = {canonical: alias for alias, canonical in aliases.items()}  # bailing: num_expert_group is n_group
    small = {}
    for key, value in defaults.items():
        if fields is not None and key not in fields:
            continue
        if isinstance(value, dict) and isinstance(value.get("model_type"), str):
            small[key] = _shrunk_config_dict(value, _registered(value["model_type"]))
        else:
            small[key] = _shrunk_either(key, named.get(key), value, n_layers)
    if isinstance(defaults.get(PER_LAYER), dict) and n_layers:  # per-layer overrides (dots3_note: its SWA layers)
        small[PER_LAYER] = _shrunk_per_layer(defaults, small, n_layers)
    _same_mha(small, defaults)
    if "head_dim" in small and small["head_dim"] is None:
        small["head_dim"] = 8
    return small


def _registered(model_type: str) -> type | None:
    try:
        return config_class(model_type)
    except DerivationError:
        return None


PER_LAYER = "per_layer_config"


def _shrunk_either(key: str, alias: str | None, value: Any, n_layers: int | None) -> Any:
    """Shrunk by its own name and by its attribute_map alias: the smaller count (a name says what it sizes)."""
    own = _shrink_nested(key, value, n_layers)
    other = _shrink_nested(alias, value, n_layers) if alias else own
    both_ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (own, other))
    return min(own, other) if both_ints else own


def _layer_count(d: dict[str, Any]) -> int | None:
    """The decoder layer count of a config dict: a count key, else the length of its per-layer type list."""
    count = next((d[k] for k in LAYER_COUNT_KEYS if isinstance(d.get(k), int)), None)
    if count is None:
        key = layer_list_key(d)
        count = len(d[key]) if key else None
    return count


def layer_list_key(d: dict[str, Any]) -> str | None:
    """The per-layer type list that sizes the model where no count key exists (nemotron_h: layers_block_type)."""
    return next((k for k, v in d.items() if k.startswith("layer") and k.endswith("type") and isinstance(v, list)), None)


def _kept_layers(n_layers: int) -> list[int]:
    """The original layers a shrunk per-layer list keeps: the first one and the last ones (see _shrunk_value)."""
    return list(range(n_layers)) if n_layers <= TINY_LAYERS else [0, *range(n_layers - TINY_LAYERS + 1, n_layers)]


def _shrunk_per_layer(defaults: dict[str, Any], small: dict[str, Any], n_layers: int) -> dict[int, Any]:
    """per_layer_config renumbered onto the kept layers, each layer's values shrunk like the global ones
    (a layer lists only what differs from the global values; keys may be zero-padded: "02")."""
    per_layer = {int(k): v for k, v in defaults[PER_LAYER].items()}
    out = {}
    for new, old in enumerate(_kept_layers(n_layers)):
        values = per_layer.get(old)
        if isinstance(values, dict):
            shrunk = {k: _shrink_nested(k, v, n_layers) for k, v in values.items()}
            merged = {**small, **shrunk}
            _same_mha(merged, {**defaults, **values})
            out[new] = {k: merged[k] for k in (*shrunk, "head_dim") if k in merged}
    return out


def _same_mha(small: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Keep the relations the shrink would break: MHA stays MHA (e.g. MLA), an MLA head_dim stays nope + rope."""
    if "num_key_value_heads" in small and defaults.get("num_key_value_heads") == defaults.get("num_attention_heads"):
        small["num_key_value_heads"] = small.get("num_attention_heads")
    parts = (defaults.get("qk_nope_head_dim"), defaults.get("qk_rope_head_dim"), defaults.get("head_dim"))
    if all(isinstance(v, int) for v in parts) and parts[0] + parts[1] == parts[2]:
        small["head_dim"] = small["qk_nope_head_dim"] + small["qk_rope_head_dim"]


def _fit_layer_lists(small: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Per-layer lists (layer_types, ...) cut to an overridden layer count."""
    n = next((small[k] for k in LAYER_COUNT_KEYS if isinstance(small.get(k), int)), None)
    if n is None or not any(k in overrides for k in LAYER_COUNT_KEYS):
        return small
    for key, value in small.items():
        per_layer = isinstance(value, list) or (isinstance(value, str) and "pattern" in key)
        if key not in overrides and per_layer and len(value) == TINY_LAYERS and n < TINY_LAYERS:
            small[key] = value[:n]
    return small


def _shrink_nested(key: str, value: Any, n_layers: int | None) -> Any:
    if isinstance(value, dict) and key not in ("id2label", "label2id", "rope_parameters", "rope_scaling"):
        return {k: _shrink_nested(k, v, n_layers) for k, v in value.items()}
    return _shrunk_value(key, value, n_layers)
