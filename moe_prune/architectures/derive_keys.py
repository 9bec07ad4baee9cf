"""Config keys of the expert count, top-k, layer count, expert groups and shared experts.

Found by perturbing candidate keys of a tiny config and watching the experts' leading dimension and
the router's top_k change, then adding their attribute_map aliases (hub files may use either name).
"""

from __future__ import annotations

from typing import Any

import torch

from moe_prune.architectures.derive_models import DerivationError, build, with_value
from moe_prune.architectures.derive_shrink import LAYER_COUNT_KEYS, TOP_K_NAMES, layer_list_key
from moe_prune.architectures.derive_structure import Structure, find_structure


def group_count_key(config) -> str | None:
    """The config key of the expert-group count (n_group, or the field an attribute_map alias names)."""
    d = config.to_dict()
    key = getattr(type(config), "attribute_map", {}).get("n_group", "n_group")
    return key if isinstance(d.get(key), int) else None


def _int_keys(d: dict[str, Any], value: int, prefix: str = "") -> list[str]:
    """Dotted keys of `d` (one nesting level) whose value is the integer `value`."""
    keys = []
    for key, v in d.items():
        if isinstance(v, dict) and not prefix:
            keys += _int_keys(v, value, f"{key}.")
        elif isinstance(v, int) and not isinstance(v, bool) and v == value:
            keys.append(prefix + key)
    return keys


def _probe(config, dotted: str, value: Any, hidden: int) -> Structure | None:
    try:
        return find_structure(build(with_value(config, dotted, value)), hidden)
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
            changed = build(with_value(config, key, k + 1))
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
    listed = layer_list_key(d)
    if listed and len(d[listed]) == structure_layers:
        return listed
    raise DerivationError("no config key gives the decoder layer count")


def shared_expert_keys(config) -> tuple[str, ...]:
    """Config keys that size always-on shared experts (by name; only reported, never edited)."""
    return tuple(k for k, v in config.to_dict().items() if "shared" in k and isinstance(v, int) and v)
