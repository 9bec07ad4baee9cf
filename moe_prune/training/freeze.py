"""Which parameters train: groups named by the adapter's runtime module paths, never by model_type.

  router     every MoE layer's router module (weight and bias)
  experts    every MoE layer's routed-experts module
  attention  every decoder layer's token mixers (`Adapter.runtime_attention`: attention and its
             linear-attention / SSM / conv replacements in hybrid families)
  all        every parameter

Selection biases (DeepSeek-V3's `e_score_correction_bias` and kin) never train: they only shift
which experts are chosen, so no gradient reaches them; the families that have them adjust them with a
load-based rule outside backpropagation. Keeping them frozen keeps them byte-identical.
"""

from __future__ import annotations

from typing import Any

from moe_prune.architectures.config import ModelConfig
from moe_prune.errors import MoePruneError


def _prefixes(model: Any, config: ModelConfig, group: str) -> list[str]:
    """Parameter-name prefixes (with trailing dot) of one group in the loaded model."""
    adapter = config.adapter
    layers = adapter.runtime_layers
    if group == "router":
        return [f"{layers}.{layer}.{adapter.runtime_router}." for layer in config.moe_layers]
    if group == "experts":
        return [f"{layers}.{layer}.{adapter.runtime_experts}." for layer in config.moe_layers]
    if group == "attention":
        return [f"{layers}.{i}.{path}." for i in range(config.num_layers) for path in adapter.runtime_attention]
    raise AssertionError(group)


def _selection_bias(config: ModelConfig) -> str | None:
    return config.adapter.memory_layout().selection_bias


def group_members(model: Any, config: ModelConfig, group: str) -> list[str]:
    """Names of the trainable parameters of `group` (selection biases excluded)."""
    bias = _selection_bias(config)
    names = [n for n, _ in model.named_parameters() if not (bias and n.endswith(bias))]
    if group == "all":
        return names
    prefixes = tuple(_prefixes(model, config, group))
    return [n for n in names if n.startswith(prefixes)]


def members_of(model: Any, config: ModelConfig, groups: tuple[str, ...]) -> set[str]:
    """Names of the parameters of all `groups`; an empty group is an error (e.g. no attention in a family)."""
    chosen: set[str] = set()
    for group in groups:
        members = group_members(model, config, group)
        if not members:
            raise MoePruneError(f"--train {group}: no such parameters in this {config.model_type} model")
        chosen.update(members)
    return chosen


def select_trainable(model: Any, config: ModelConfig, groups: tuple[str, ...]) -> list[str]:
    """Set requires_grad on exactly the parameters of `groups`; returns their names, in model order."""
    chosen = members_of(model, config, groups)
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    return [n for n, _ in model.named_parameters() if n in chosen]
