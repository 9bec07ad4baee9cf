"""Adapters derived from transformers' own modules, for families the table has no row for.

transformers 5 builds (almost) every MoE block the same way: an `*Experts` module holding fused
parameters with a leading expert axis next to a router module holding an [E, H] weight. So the
adapter of a model type can be read off the model itself instead of being written by hand, one job
per module:

- tiny models (`derive_models`) from the config class defaults, shrunk (`derive_shrink`);
- structure (`derive_structure`): layer list, router, experts, MoE layers;
- config keys (`derive_keys`) of the expert count and top-k by perturbing candidate keys;
- on-disk keys (`derive_conversion`) by reverting transformers' own weight conversion;
- the routing rule (`derive_routing`) by running the tiny model.

This module puts them together into an `Adapter`, and reads where wrappers keep their text model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from moe_prune.architectures.derive_conversion import DiskKeys, disk_keys, expert_tensor_layout
from moe_prune.architectures.derive_keys import (
    expert_count_keys,
    group_count_key,
    layer_count_key,
    shared_expert_keys,
    top_k_keys,
)
from moe_prune.architectures.derive_models import DerivationError, build, first_line, text_model_type
from moe_prune.architectures.derive_routing import routing
from moe_prune.architectures.derive_shrink import shrink_config
from moe_prune.architectures.derive_structure import Structure, find_structure, token_mixers
from moe_prune.architectures.spec import Adapter, Routing


@dataclass(frozen=True)
class Derived:
    """A derived adapter and what could not be read (routing notes), for the README table."""

    adapter: Adapter
    notes: tuple[str, ...] = ()


def derive(model_type: str, overrides: dict[str, Any] | None = None) -> Derived:
    """The adapter of `model_type` read off transformers' modules; DerivationError says what is missing."""
    text_type = text_model_type(model_type)
    if text_type != model_type:
        raise DerivationError(f"a wrapper; its text model is {text_type!r}")
    config, model = _tiny_model(model_type, overrides)
    hidden = config.to_dict().get("hidden_size") or getattr(config, "hidden_size", None)
    structure = find_structure(model, hidden)
    count_keys = expert_count_keys(config, structure, hidden)
    k_keys = top_k_keys(config, model, structure)
    n_layers = len(model.get_submodule(structure.layers))
    disk = _disk_keys(config, structure)
    group_key = group_count_key(config)
    rule, position, selection, notes = _routing(config, structure, disk, group_key)
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
        routing=rule or Routing(grouped=group_key is not None),
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
        expert_tensors=expert_tensor_layout(disk, experts_module, hidden),
    )
    return Derived(adapter, notes)


def _tiny_model(model_type: str, overrides: dict[str, Any] | None) -> tuple[Any, torch.nn.Module]:
    """The shrunk config and its model on the meta device; any failure a DerivationError naming its cause."""
    try:
        config = shrink_config(model_type, overrides)
        return config, build(config)
    except DerivationError:
        raise
    except Exception as exc:
        raise DerivationError(f"cannot build a tiny model ({type(exc).__name__}: {first_line(exc)})") from exc


def _disk_keys(config, structure: Structure) -> DiskKeys:
    """The saved keys of a tiny model built on the CPU (values are numbered, so it needs real memory)."""
    try:
        torch.manual_seed(0)
        return disk_keys(build(config, "cpu"), structure)
    except DerivationError:
        raise
    except Exception as exc:
        raise DerivationError(f"cannot map saved keys ({type(exc).__name__}: {first_line(exc)})") from exc


def _routing(
    config, structure: Structure, disk: DiskKeys, group_key: str | None
) -> tuple[Routing | None, Any, str, tuple[str, ...]]:
    """The routing rule, the logits position, selection_from and a note where the rule was not read."""
    selection_memory = dict(disk.memory_keys).get("selection_bias", disk.selection_bias)
    try:
        rule, position, selection = routing(config, structure, selection_memory, group_key)
        notes = () if rule is not None else ("routing rule not recognised; statistics assume softmax",)
    except Exception as exc:
        rule, position, selection = None, 0, "experts_args"
        notes = (f"routing not read ({type(exc).__name__}: {first_line(exc)})",)
    return rule, position, selection, notes


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
