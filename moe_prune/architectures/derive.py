"""Adapters derived from transformers' own modules, for families the table has no row for.

transformers 5 builds (almost) every MoE block the same way: an `*Experts` module holding fused
parameters with a leading expert axis next to a router module holding an [E, H] weight. So the
adapter of a model type can be read off the model itself instead of being written by hand:

- structure (layer list, router, experts, MoE layers) from a tiny model built from the config
  class defaults, shrunk (`shrink_config`); MoE layers of a user's config from that config built on
  the meta device (layer rule "derived");
- config keys of the expert count and top-k by perturbing candidate keys and watching the experts'
  leading dimension and the router's top_k change;
- on-disk keys by reverting transformers' own weight conversion (what `save_pretrained` writes) on
  a tiny model whose every parameter holds distinct values, and finding each value again;
- the routing rule by running the tiny model and checking which rule reproduces the experts'
  (top_k_index, top_k_weights) from the router's logits.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import json
import re
from dataclasses import dataclass
from typing import Any

import torch

from moe_prune.architectures.spec import STANDARD_EXPERT_TENSORS, Adapter, ExpertTensor, Routing
from moe_prune.artifacts.common import parse_json
from moe_prune.errors import MoePruneError

ROUTER_CLASS = re.compile(r"(Router|TopkRouter|TopKRouter|Gate|Gating)$")
TOKEN_MIXER_CLASS = re.compile(r"(Attention|Mamba|Mixer|DeltaNet|Conv)", re.IGNORECASE)
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


class DerivationError(MoePruneError):
    """The derivation could not find something it needs; the message says what."""


@dataclass(frozen=True)
class Derived:
    """A derived adapter and what could not be read (routing notes), for the README table."""

    adapter: Adapter
    notes: tuple[str, ...] = ()


# -- transformers classes -----------------------------------------------------------------------


@functools.cache
def moe_causal_lm_types() -> tuple[str, ...]:
    """The MoE causal LMs of the installed transformers: MODEL_FOR_CAUSAL_LM_MAPPING_NAMES types whose modeling
    file defines an experts or MoE-block class (transformers' own list, filtered; not a hand-kept one)."""
    from pathlib import Path

    import transformers
    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    root = Path(transformers.__file__).parent / "models"
    pattern = re.compile(r"^class \w+(Experts|MoE|Moe|SparseMoeBlock)\w*\(", re.MULTILINE)
    found = []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        module = model_type_to_module_name(model_type)
        source = root / module / f"modeling_{module}.py"
        if source.exists() and pattern.search(source.read_text()):
            found.append(model_type)
    return tuple(found)


def config_class(model_type: str) -> type:
    """The config class transformers registers for `model_type` (registered ones included)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[model_type]
    except KeyError as exc:
        raise DerivationError(f"transformers knows no model_type {model_type!r}") from exc


@functools.cache
def text_model_type(model_type: str) -> str:
    """The model_type that holds the MoE text model: a wrapper's text config type, else itself."""
    cfg = config_class(model_type)()
    sub = getattr(cfg, "text_config", None)
    return sub.model_type if sub is not None and hasattr(sub, "model_type") else model_type


def causal_lm_class(config) -> type:
    """The CausalLM class AutoModelForCausalLM builds for this config."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError as exc:
        raise DerivationError(f"no causal-LM class for {config.model_type!r}") from exc


# -- tiny configs --------------------------------------------------------------------------------


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


def group_count_key(config) -> str | None:
    """The config key of the expert-group count (n_group, or the field an attribute_map alias names)."""
    d = config.to_dict()
    key = getattr(type(config), "attribute_map", {}).get("n_group", "n_group")
    return key if isinstance(d.get(key), int) else None


def _layer_count(d: dict[str, Any]) -> int | None:
    """The decoder layer count of a config dict: a count key, else the length of its per-layer type list."""
    count = next((d[k] for k in LAYER_COUNT_KEYS if isinstance(d.get(k), int)), None)
    if count is None:
        key = _layer_list_key(d)
        count = len(d[key]) if key else None
    return count


def _layer_list_key(d: dict[str, Any]) -> str | None:
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


# -- models ---------------------------------------------------------------------------------------


def build(config, device: str = "meta") -> torch.nn.Module:
    """The CausalLM of `config` on `device` (meta: no memory, no init)."""
    cls = causal_lm_class(config)
    with torch.device(device):
        model = cls._from_config(config) if device != "meta" else cls(config)
    return model.eval()


def _leading_experts(module: torch.nn.Module) -> int | None:
    """The expert count of an experts module: the common leading dimension of its 3-D parameters."""
    dims = {p.shape[0] for p in module.parameters() if p.dim() == 3}
    return dims.pop() if len(dims) == 1 else None


def _is_experts(name: str, module: torch.nn.Module) -> bool:
    """An `*Experts` module with a leading expert axis that is not the always-on shared experts."""
    cls = type(module).__name__
    shared = "shared" in name.rsplit(".", 1)[-1].lower()  # by path: GraniteMoeSharedExperts is routed
    return cls.endswith("Experts") and not shared and _leading_experts(module) is not None


@dataclass(frozen=True)
class Structure:
    """Where the MoE pieces of one model live in memory."""

    layers: str  # module path of the decoder layer list
    moe_layers: tuple[int, ...]
    experts: str  # path inside one decoder layer
    router: str  # the router module (its output carries the logits)
    router_weight: str  # the [E, H] parameter, path inside one decoder layer
    n_experts: int


def find_structure(model: torch.nn.Module, hidden: int) -> Structure:
    """Decoder layer list, experts and router of a built model; DerivationError if there is none."""
    experts = [(n, m) for n, m in model.named_modules() if _is_experts(n, m)]
    if not experts:
        raise DerivationError("no *Experts module with fused 3-D expert parameters")
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    owner = next(((n, m) for n, m in lists if experts[0][0].startswith(n + ".")), None)
    if owner is None:
        raise DerivationError("experts module outside any decoder layer list")
    layers_path, layer_list = owner
    moe, inner = [], set()
    for name, _module in experts:
        match = re.match(re.escape(layers_path) + r"\.(\d+)\.(.+)$", name)
        if match:
            moe.append(int(match[1]))
            inner.add(match[2])
    if len(inner) != 1:
        raise DerivationError(f"experts modules at differing paths {sorted(inner)}")
    experts_path = inner.pop()
    layer = layer_list[moe[0]]
    n = _leading_experts(layer.get_submodule(experts_path))
    router, weight = _find_router(layer, experts_path, n, hidden)
    return Structure(layers_path, tuple(sorted(set(moe))), experts_path, router, weight, n)


def _find_router(layer: torch.nn.Module, experts: str, n: int, hidden: int) -> tuple[str, str]:
    """The router module next to the experts and its [E, H] weight, both relative to the layer."""
    block = experts.rsplit(".", 1)[0] if "." in experts else ""
    scope = layer.get_submodule(block) if block else layer
    prefix = f"{block}." if block else ""
    weights = [
        f"{prefix}{n_}"
        for n_, p in scope.named_parameters()
        if p.dim() == 2 and tuple(p.shape) == (n, hidden) and not f"{prefix}{n_}".startswith(experts + ".")
    ]
    if len(weights) != 1:
        raise DerivationError(f"{len(weights)} router weights of shape [{n}, {hidden}] next to {experts}")
    weight = weights[0]
    parts = weight.split(".")[:-1]
    candidates = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    named = [c for c in candidates if ROUTER_CLASS.search(type(layer.get_submodule(c)).__name__)]
    return (named[0] if named else ".".join(parts)), weight


# -- config keys ----------------------------------------------------------------------------------


def _int_keys(d: dict[str, Any], value: int, prefix: str = "") -> list[str]:
    """Dotted keys of `d` (one nesting level) whose value is the integer `value`."""
    keys = []
    for key, v in d.items():
        if isinstance(v, dict) and not prefix:
            keys += _int_keys(v, value, f"{key}.")
        elif isinstance(v, int) and not isinstance(v, bool) and v == value:
            keys.append(prefix + key)
    return keys


def _with(config, dotted: str, value: Any):
    d = config.to_dict()
    target = d
    *parents, last = dotted.split(".")
    for part in parents:
        target = target[part]
    target[last] = value
    return type(config).from_dict(d)


def _probe(config, dotted: str, value: Any, hidden: int) -> Structure | None:
    try:
        return find_structure(build(_with(config, dotted, value)), hidden)
    except Exception:
        return None


def expert_count_keys(config, structure: Structure, hidden: int) -> tuple[str, ...]:
    """Config keys whose change changes the experts' leading dimension, then their aliases."""
    found: list[str] = []
    for bigger in (structure.n_experts * 2, structure.n_experts * 5):  # x5 where x2 meets another [E, H] weight
        found = found or [
            key
            for key in _int_keys(config.to_dict(), structure.n_experts)
            if (s := _probe(config, key, bigger, hidden)) and s.n_experts == bigger
        ]
    if not found:
        raise DerivationError(f"no config key sets the expert count {structure.n_experts}")
    return (*found, *_aliases(type(config), found))


def _aliases(cls: type, keys: list[str]) -> list[str]:
    """attribute_map aliases of `keys` (hub files may use either name)."""
    return [alias for alias, canonical in getattr(cls, "attribute_map", {}).items() if canonical in keys]


def _top_k_of(model: torch.nn.Module, structure: Structure) -> int | None:
    layer = model.get_submodule(f"{structure.layers}.{structure.moe_layers[0]}")
    for path in (structure.router, structure.experts.rsplit(".", 1)[0]):
        module = layer.get_submodule(path) if path else layer
        for attr in ("top_k", "num_experts_per_tok", "topk", "k"):
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def top_k_keys(config, model: torch.nn.Module, structure: Structure) -> tuple[str, ...]:
    """Config keys whose change changes the router's (or MoE block's) top_k attribute."""
    k = _top_k_of(model, structure)
    if k is None:
        named = [key for key in TOP_K_NAMES if isinstance(config.to_dict().get(key), int)]
        if len(named) == 1:
            return (named[0],)
        raise DerivationError("no top_k attribute on the router or MoE block, and no single top-k config key")
    found = []
    for key in _int_keys(config.to_dict(), k):
        try:
            changed = build(_with(config, key, k + 1))
        except Exception:
            continue
        if _top_k_of(changed, structure) == k + 1:
            found.append(key)
    if not found:
        raise DerivationError(f"no config key sets top-k {k}")
    return (*found, *_aliases(type(config), found))


def layer_count_key(config, structure_layers: int) -> str:
    """The config key of the decoder layer count: a count, else a per-layer type list of that length."""
    d = config.to_dict()
    for key in LAYER_COUNT_KEYS:
        if d.get(key) == structure_layers:
            return key
    listed = _layer_list_key(d)
    if listed and len(d[listed]) == structure_layers:
        return listed
    raise DerivationError("no config key gives the decoder layer count")


def shared_expert_keys(config) -> tuple[str, ...]:
    """Config keys that size always-on shared experts (by name; only reported, never edited)."""
    return tuple(k for k, v in config.to_dict().items() if "shared" in k and isinstance(v, int) and v)


# -- on-disk keys ---------------------------------------------------------------------------------


def _numbered(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Fill every float parameter and buffer with distinct integers; name -> [start, end) of its values."""
    spans, start = {}, 1
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point():
                continue
            n = tensor.numel()
            tensor.copy_(torch.arange(start, start + n, dtype=torch.float64).reshape(tensor.shape))
            spans[name] = (start, start + n)
            start += n
    if start >= 1 << 24:
        raise DerivationError("tiny model too large to number its values exactly")
    return spans


def _source(spans: dict[str, tuple[int, int]], tensor: torch.Tensor) -> tuple[str, int] | None:
    """The in-memory parameter a saved tensor came from, and the offset of its first value."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    first = int(tensor.reshape(-1)[0].item())
    for name, (lo, hi) in spans.items():
        if lo <= first < hi:
            return name, first - lo
    return None


def saved_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What `save_pretrained` writes (legacy layout): transformers' own conversion reverted."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(model.state_dict()))


@dataclass(frozen=True)
class DiskKeys:
    layer_prefix: str
    router: str
    router_bias: str | None
    selection_bias: str | None
    experts: str
    fused_experts: tuple[str, ...]
    memory_keys: tuple[tuple[str, str], ...]
    expert_shapes: tuple[tuple[str, tuple[int, ...]], ...]  # key suffix -> one expert's shape
    reordered: frozenset[str] = frozenset()  # suffixes whose saved rows are a permutation of memory's (Interleave)
    vectors: tuple[str, ...] = ()  # other [E] tensors of the router or MoE block (gemma4: router.per_expert_scale)


def _layer_prefix(key: str, layer: int) -> tuple[str, str]:
    """Split a saved key at its layer number: ('model.layers.{L}.', rest)."""
    match = re.match(r"^(.*?\.)" + str(layer) + r"\.(.+)$", key)
    if not match:
        raise DerivationError(f"router key {key!r} holds no layer number {layer}")
    return match[1] + "{L}.", match[2]


def disk_keys(model: torch.nn.Module, structure: Structure) -> DiskKeys:
    """Map the router, biases and experts of MoE layer `moe_layers[-1]` to the keys save_pretrained writes."""
    layer = structure.moe_layers[-1]
    base = f"{structure.layers}.{layer}."
    spans = _numbered(model)
    by_source: dict[str, list[tuple[str, torch.Tensor, int]]] = {}
    for key, tensor in saved_state(model).items():
        if (src := _source(spans, tensor)) is not None and src[0].startswith(base):
            by_source.setdefault(src[0][len(base) :], []).append((key, tensor, src[1]))
    router_saved = by_source.get(structure.router_weight)
    if not router_saved:
        raise DerivationError("router weight not found among the saved tensors")
    prefix, router = _layer_prefix(router_saved[0][0], layer)
    head = prefix.replace("{L}", str(layer))
    rel = {name: [(k[len(head) :], t, off) for k, t, off in items] for name, items in by_source.items()}
    router_bias, _ = _bias_key(rel, structure, "router")
    selection_bias, selection_memory = _bias_key(rel, structure, "selection")
    experts, fused, shapes, reordered = _expert_keys(rel, structure)
    memory = _memory_keys(structure, selection_bias, selection_memory, model, base)
    vectors = _expert_vectors(rel, structure, {router, router_bias, selection_bias})
    return DiskKeys(prefix, router, router_bias, selection_bias, experts, fused, memory, shapes, reordered, vectors)


def _expert_vectors(rel, structure: Structure, claimed: set[str | None]) -> tuple[str, ...]:
    """Saved keys of 1-D [E] tensors in the router or MoE block besides its weight and biases: one value per
    expert that surgery must slice with the router rows (gemma4 scales the chosen weights by per_expert_scale)."""
    block = structure.experts.rsplit(".", 1)[0] if "." in structure.experts else ""
    scopes = tuple(f"{s}." for s in (structure.router, block) if s)
    found = []
    for name, items in rel.items():
        key, tensor = items[0][0], items[0][1]
        inside = name.startswith(scopes) and not name.startswith(structure.experts + ".")
        if inside and key not in claimed and tuple(tensor.shape) == (structure.n_experts,):
            found.append(key)
    return tuple(sorted(found))


def _bias_vectors(structure: Structure) -> tuple[str, ...]:
    return (structure.router_weight.rsplit(".", 1)[0] + ".bias",)


def _bias_key(rel, structure: Structure, kind: str) -> tuple[str | None, str | None]:
    """(saved key, in-memory name) of the router's own bias (`router`) or of an [E] selection bias (`selection`).

    The saved tensor holds the numbered values of the in-memory one, so the pair is exact even where the
    two names share nothing (kolibri1: moe.router.expert_bias saved from mlp.gate.e_score_correction_bias)."""
    router_bias = _bias_vectors(structure)
    block = structure.experts.rsplit(".", 1)[0] if "." in structure.experts else ""
    for name, items in rel.items():
        if kind == "router" and name in router_bias:
            return items[0][0], name
        shape = items[0][1].shape
        in_block = name.startswith(block + ".") or not block
        named = in_block and name not in router_bias and "bias" in name.rsplit(".", 1)[-1]
        vector = shape[-1] == structure.n_experts and len(shape) <= 2 and all(d == 1 for d in shape[:-1])
        if kind == "selection" and named and vector:
            return items[0][0], name
    return None, None


def _expert_keys(rel, structure: Structure):
    """Container prefix of per-expert keys (or of fused ones), the other fused prefixes, shapes, reordered suffixes."""
    n = structure.n_experts
    stems: set[str] = set()
    fused: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    reordered: set[str] = set()
    for name, items in rel.items():
        if not name.startswith(structure.experts + "."):
            continue
        for key, tensor, _ in items:
            per_expert = re.match(r"^(.*\.)(\d+)\.(.+)$", key)
            if per_expert and len(items) % n == 0 and len(items) >= n:
                stems.add(per_expert[1])
                shapes[_suffix(key)] = tuple(tensor.shape)
                one = tensor
            else:
                parent = key.rsplit(".", 1)[0] + "."
                if parent not in fused:
                    fused.append(parent)
                shapes[_suffix(key)] = tuple(tensor.shape[1:])
                one = tensor[0]
            if _reordered(one):
                reordered.add(_suffix(key))
    if len(stems) > 1:
        raise DerivationError(f"per-expert keys under several containers {sorted(stems)}")
    if not stems and not fused:
        raise DerivationError("no saved expert tensors")
    experts = stems.pop() if stems else fused.pop(0)
    return experts, tuple(f for f in fused if f != experts), tuple(sorted(shapes.items())), frozenset(reordered)


def _reordered(numbered: torch.Tensor) -> bool:
    """True when the saved values of one expert step unevenly along an axis: rows permuted (e.g. interleaved)
    by the weight conversion, not a plain copy or transpose of the numbered parameter."""
    for axis in range(numbered.dim()):
        if numbered.shape[axis] > 2:
            line = numbered.movedim(axis, 0).reshape(numbered.shape[axis], -1)[:, 0].double()
            steps = line.diff()
            if not torch.equal(steps, steps[:1].expand_as(steps)):
                return True
    return False


def _suffix(key: str) -> str:
    """The tensor's own name: its last component, with the module name before a weight/bias."""
    parts = key.split(".")
    return ".".join(parts[-2:]) if parts[-1] in ("weight", "bias") and len(parts) > 1 else parts[-1]


def _memory_keys(structure, selection_bias, selection_memory, model, base) -> tuple[tuple[str, str], ...]:
    """In-memory names where they differ from what `Adapter.memory_layout` assumes."""
    keys = []
    if structure.router_weight != f"{structure.router}.weight":
        keys.append(("router", structure.router_weight))
    if selection_memory is not None and selection_memory != selection_bias:
        keys.append(("selection_bias", selection_memory))
    experts_params = {n.rsplit(".", 1)[0] for n, _ in model.get_submodule(base + structure.experts).named_parameters()}
    if experts_params != {""} and len(experts_params) == 1:
        keys.append(("experts", f"{structure.experts}.{experts_params.pop()}."))
    return tuple(keys)


def expert_tensors(
    shapes: tuple[tuple[str, tuple[int, ...]], ...],
    hidden: int,
    interleaved: bool,
    reordered: frozenset[str] = frozenset(),
):
    """Where the intermediate axis lies in each expert tensor, read from the shapes (H != I).

    `interleaved`: the experts' forward splits gate/up by alternate rows; a tensor in `reordered` is saved
    with its rows permuted against memory (transformers' Interleave conversion), which flips that.
    """
    non_hidden = [d for _, shape in shapes for d in shape if d != hidden]
    if not non_hidden:
        return STANDARD_EXPERT_TENSORS
    inner = min(non_hidden)
    out = []
    for suffix, shape in shapes:
        axes = [i for i, d in enumerate(shape) if d != hidden]
        axis = axes[0] if axes else None
        parts = shape[axis] // inner if axis is not None else 1
        flipped = interleaved != (suffix in reordered)
        out.append(ExpertTensor(suffix, axis, parts=parts, interleaved=flipped and parts == 2))
    return (*out, *STANDARD_EXPERT_TENSORS)


def _with_memory_names(listed: tuple[ExpertTensor, ...], experts: torch.nn.Module, hidden: int):
    """The on-disk rows, then rows for the in-memory names where they differ (the fused layout
    `save_pretrained(..., save_original_format=False)` writes, e.g. aria's gate_up_proj is [E, H, 2I])."""
    known = {t.suffix for t in listed[: len(listed) - len(STANDARD_EXPERT_TENSORS)]}
    memory = tuple((n, tuple(p.shape[1:])) for n, p in experts.named_parameters() if p.dim() >= 2)
    extra = [t for t in expert_tensors(memory, hidden, _interleaved(experts)) if t.suffix not in known]
    derived = listed[: len(listed) - len(STANDARD_EXPERT_TENSORS)]
    return (*derived, *[t for t in extra if t not in STANDARD_EXPERT_TENSORS], *STANDARD_EXPERT_TENSORS)


def _interleaved(experts: torch.nn.Module) -> bool:
    """gpt-oss style gate/up interleaving, read from the experts' forward source."""
    try:
        source = inspect.getsource(type(experts))
    except (OSError, TypeError):
        return False
    return "::2" in source


# -- routing ----------------------------------------------------------------------------------------


@dataclass
class _Capture:
    inputs: list[torch.Tensor]
    outputs: list[Any]
    selections: list[tuple[torch.Tensor, torch.Tensor]]


def _capture(model, structure: Structure, vocab: int) -> _Capture:
    layer = model.get_submodule(f"{structure.layers}.{structure.moe_layers[-1]}")
    router, experts = layer.get_submodule(structure.router), layer.get_submodule(structure.experts)
    cap = _Capture([], [], [])

    def on_router(_m, args, output):
        cap.inputs.append(args[0].detach())
        cap.outputs.append(output)

    def on_experts(_m, args, kwargs):
        values = list(args[1:]) + [v for k, v in kwargs.items() if k != "hidden_states"]
        ints = [v for v in values if isinstance(v, torch.Tensor) and not v.is_floating_point()]
        floats = [v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()]
        if ints and floats:
            cap.selections.append((ints[0], floats[0]))

    handles = [router.register_forward_hook(on_router), experts.register_forward_pre_hook(on_experts, with_kwargs=True)]
    torch.manual_seed(0)
    try:
        with torch.no_grad():
            model(torch.randint(0, vocab, (2, 16)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if not cap.outputs:
        raise DerivationError("router never ran")
    return cap


def _logits_index(output: Any, logits: torch.Tensor) -> int | str | None:
    """Which element of the router output holds the logits (None: the output is them; 'none': not found)."""
    flat = logits.reshape(-1, logits.shape[-1])
    items = [output] if isinstance(output, torch.Tensor) else list(output)
    for i, item in enumerate(items):
        same_shape = (
            isinstance(item, torch.Tensor) and item.shape[-1] == flat.shape[-1] and item.numel() == flat.numel()
        )
        if same_shape and torch.allclose(item.reshape(flat.shape).double(), flat.double(), atol=1e-5):
            return None if isinstance(output, torch.Tensor) else i
    return "none"


def _rule_matches(rule: Routing, logits, bias, top_k, index, weights) -> bool:
    z = logits.double().reshape(-1, logits.shape[-1])
    scores = torch.sigmoid(z) if rule.score == "sigmoid" else torch.softmax(z, -1)
    select = {"scores+bias": scores, "logits+bias": z}.get(rule.select_on)
    select = scores if select is None else select + bias.double().reshape(-1)
    ours = select.topk(top_k, -1).indices
    got = index.reshape(ours.shape).long()
    if not torch.equal(ours.sort(-1).values, got.sort(-1).values):
        return False
    w = scores.gather(-1, got)
    if rule.renormalize:
        w = w / w.sum(-1, keepdim=True)
    theirs = weights.double().reshape(w.shape)
    scale = (theirs.sum() / w.sum()).item()  # a routed_scaling_factor multiplies all weights
    return scale > 0 and torch.allclose(w * scale, theirs, atol=1e-4, rtol=1e-3)


def _read_rule(model, structure: Structure, config, bias_path: str | None) -> tuple[Routing | None, int | None, str]:
    """The first candidate rule that reproduces the experts' inputs, the logits index, selection_from."""
    cap = _capture(model, structure, config.vocab_size)
    layer = model.get_submodule(f"{structure.layers}.{structure.moe_layers[-1]}")
    weight = layer.get_parameter(structure.router_weight)
    bias_name = structure.router_weight.rsplit(".", 1)[0] + ".bias"
    router_bias = dict(layer.named_parameters()).get(bias_name)
    x = cap.inputs[0].reshape(-1, weight.shape[1])
    logits = torch.nn.functional.linear(x.to(weight.dtype), weight, router_bias)
    position = _logits_index(cap.outputs[0], logits)
    if position == "none":
        raise DerivationError("router output holds no logits equal to its linear layer's")
    selection = "experts_args" if cap.selections else "router_scores"
    picked = cap.selections[0] if cap.selections else _scores_selection(cap.outputs[0], position)
    if picked is None:
        return None, position, selection
    index, weights = picked
    sel_bias = _buffer(layer, bias_path) if bias_path else torch.zeros(structure.n_experts)
    for rule in _candidates(bias_path is not None):
        if _rule_matches(rule, logits, sel_bias, index.shape[-1], index, weights):
            return rule, position, selection
    return None, position, selection


def _scores_selection(output: Any, position: int | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(index, weights) from a router that returns dense [T, E] scores, zero where not selected (Llama 4)."""
    if isinstance(output, torch.Tensor):
        return None
    for i, item in enumerate(output):
        if i != position and isinstance(item, torch.Tensor) and item.is_floating_point() and item.dim() >= 2:
            scores = item.reshape(-1, item.shape[-1])
            k = int((scores != 0).sum(-1).max())
            if 0 < k < scores.shape[-1]:
                index = scores.topk(k, -1).indices
                return index, scores.gather(-1, index)
    return None


def _buffer(layer: torch.nn.Module, path: str) -> torch.Tensor:
    named = dict(layer.named_buffers()) | dict(layer.named_parameters())
    if path not in named:  # saved under another name than in memory: the one [E] bias with the same last name
        last = path.rsplit(".", 1)[-1]
        path = next((n for n in named if n.rsplit(".", 1)[-1] == last), None)
        if path is None:
            raise DerivationError(f"selection bias {last!r} not found in memory")
    return named[path].detach()


def _candidates(with_bias: bool) -> list[Routing]:
    select = ("scores+bias", "logits+bias") if with_bias else ("scores",)
    return [
        Routing(score=score, select_on=on, renormalize=renorm)
        for on in select
        for score in ("softmax", "sigmoid")
        for renorm in (True, False)
    ]


def routing(
    config, structure: Structure, bias_path: str | None, group_key: str | None
) -> tuple[Routing | None, Any, str]:
    """The routing rule, read by running a tiny real model; renormalize tied to norm_topk_prob if it decides."""
    grouped = group_key is not None
    probe = _with(config, group_key, 1) if group_key else config
    torch.manual_seed(0)
    model = build(probe, "cpu")
    _randomize(model)
    rule, position, selection = _read_rule(model, structure, probe, bias_path)
    if rule is not None and isinstance(probe.to_dict().get("norm_topk_prob"), bool):
        flipped = _with(probe, "norm_topk_prob", not probe.to_dict()["norm_topk_prob"])
        torch.manual_seed(0)
        other = build(flipped, "cpu")
        _randomize(other)
        rule2, _, _ = _read_rule(other, structure, flipped, bias_path)
        if rule2 is not None and rule2.renormalize != rule.renormalize:
            rule = Routing(rule.score, rule.select_on, "norm_topk_prob", grouped)
    if rule is not None:
        rule = Routing(rule.score, rule.select_on, rule.renormalize, grouped)
    return rule, position, selection


def _randomize(model: torch.nn.Module) -> None:
    """Spread values so that routing choices are clear-cut (default init is near zero)."""
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if tensor.is_floating_point() and ("bias" in name or "gate" in name or "router" in name):
                tensor.normal_(0.0, 1.0)


# -- the adapter ------------------------------------------------------------------------------------


def token_mixers(model: torch.nn.Module, structure: Structure) -> tuple[str, ...]:
    """Children of decoder layers that mix tokens (attention, SSM, conv), for `finetune --train attention`."""
    names: list[str] = []
    for layer in model.get_submodule(structure.layers):
        for name, child in layer.named_children():
            if TOKEN_MIXER_CLASS.search(type(child).__name__) and name not in names:
                names.append(name)
    return tuple(names) or ("self_attn",)


def derive(model_type: str, overrides: dict[str, Any] | None = None) -> Derived:
    """The adapter of `model_type` read off transformers' modules; DerivationError says what is missing."""
    text_type = text_model_type(model_type)
    if text_type != model_type:
        raise DerivationError(f"a wrapper; its text model is {text_type!r}")
    try:
        config = shrink_config(model_type, overrides)
        model = build(config)
    except DerivationError:
        raise
    except Exception as exc:
        raise DerivationError(f"cannot build a tiny model ({type(exc).__name__}: {_first_line(exc)})") from exc
    hidden = config.to_dict().get("hidden_size") or getattr(config, "hidden_size", None)
    structure = find_structure(model, hidden)
    count_keys = expert_count_keys(config, structure, hidden)
    k_keys = top_k_keys(config, model, structure)
    n_layers = len(model.get_submodule(structure.layers))
    try:
        torch.manual_seed(0)
        disk = disk_keys(build(config, "cpu"), structure)
    except DerivationError:
        raise
    except Exception as exc:
        raise DerivationError(f"cannot map saved keys ({type(exc).__name__}: {_first_line(exc)})") from exc
    group_key = group_count_key(config)
    grouped = group_key is not None
    selection_memory = dict(disk.memory_keys).get("selection_bias", disk.selection_bias)
    try:
        rule, position, selection = routing(config, structure, selection_memory, group_key)
        notes = () if rule is not None else ("routing rule not recognised; statistics assume softmax",)
    except Exception as exc:
        rule, position, selection = None, 0, "experts_args"
        notes = (f"routing not read ({type(exc).__name__}: {_first_line(exc)})",)
    experts_module = model.get_submodule(f"{structure.layers}.{structure.moe_layers[0]}.{structure.experts}")
    adapter = Adapter(
        model_type=model_type,
        expert_count_keys=count_keys,
        top_k_keys=k_keys,
        moe_layers="derived",
        router=disk.router,
        experts=disk.experts,
        layer_prefix=disk.layer_prefix,
        fused_experts=disk.fused_experts,
        expert_vectors=disk.vectors,
        router_bias=disk.router_bias,
        selection_bias=disk.selection_bias,
        routing=rule or Routing(grouped=grouped),
        layer_count_key=layer_count_key(config, n_layers),
        group_count_key=group_key or "n_group",
        shared_expert_keys=shared_expert_keys(config),
        runtime_layers=structure.layers,
        runtime_router=structure.router,
        runtime_experts=structure.experts,
        router_logits_output=position,
        selection_from=selection,
        memory_keys=disk.memory_keys,
        runtime_attention=token_mixers(model, structure),
        expert_tensors=_with_memory_names(  # expert_vectors are not expert tensors: merge applies the router rule
            expert_tensors(disk.expert_shapes, hidden, _interleaved(experts_module), disk.reordered),
            experts_module,
            hidden,
        ),
    )
    return Derived(adapter, notes)


@dataclass(frozen=True)
class WrapperLayout:
    """Where a wrapper (multimodal model with a text_config) keeps its language model's decoder layers."""

    layer_prefix: str  # on disk, in the checkpoints saved with the wrapper's config.json
    runtime_layers: str  # in the model AutoModelForCausalLM builds


@functools.cache
def wrapper_layout(model_type: str) -> WrapperLayout:
    """The layer prefixes of a wrapper, read off the tiny models of the classes transformers builds for its config.

    On disk: what the image-text-to-text class writes (Qwen3.5-MoE: model.language_model.layers.{L}.), the only
    class that saves the wrapper's config.json (the causal LM saves its text config); in memory: the causal LM
    that moe-prune loads (Qwen3.5-MoE: model.layers)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    config = shrink_config(model_type)
    hidden = _hidden_size(config)
    autos = [AutoModelForCausalLM]
    if type(config) in AutoModelForImageTextToText._model_mapping:
        autos.append(AutoModelForImageTextToText)
    found = []
    for auto in autos:
        torch.manual_seed(0)
        model = auto.from_config(config).eval()
        structure = find_structure(model, hidden)
        found.append((disk_keys(model, structure).layer_prefix, structure.layers))
    return WrapperLayout(found[-1][0], found[0][1])


def _hidden_size(config) -> int:
    """The hidden size of a config or of its text config."""
    text = getattr(config, "text_config", None)
    return getattr(text, "hidden_size", None) or config.hidden_size


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else ""


# -- MoE layers of a user's config --------------------------------------------------------------------


def moe_layers_of(config: dict[str, Any]) -> list[int]:
    """MoE layer indices of a (text) config dict: the layers that get an experts module on the meta device."""
    return list(_moe_layers_cached(json.dumps(config, sort_keys=True, default=str)))


@functools.lru_cache(maxsize=64)
def _moe_layers_cached(blob: str) -> tuple[int, ...]:
    raw = parse_json(blob, "config.json", "config")  # our own dump of a config already read by parse_json
    cls = config_class(raw["model_type"])
    try:
        model = build(cls.from_dict(cls._decode_special_floats(raw)))  # {"__float__": "Infinity"} as from_pretrained
    except Exception as exc:
        raise ValueError(_first_line(exc)) from exc
    moe = []
    for name, module in model.named_modules():
        if _is_experts(name, module) and (m := re.match(r"^(.*?)\.(\d+)\.", name)):
            moe.append(int(m[2]))
    return tuple(sorted(set(moe)))
