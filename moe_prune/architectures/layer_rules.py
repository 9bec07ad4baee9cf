"""Which decoder layers are MoE layers, one small rule per config convention.

Each rule reads the (text) config dict and returns the sorted MoE layer indices; defaults
mirror the transformers config classes so hub files that omit a field still work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moe_prune.registry import Registry

LayerRule = Callable[[dict[str, Any], int], list[int]]
LAYER_RULES: Registry[LayerRule] = Registry("layer rule")
rule = LAYER_RULES.decorator  # `@rule("name")` registers a rule, referenced by `Adapter.moe_layers`


@rule("all")
def all_layers(config: dict[str, Any], n_layers: int) -> list[int]:
    """Every decoder layer is an MoE layer (Mixtral, OLMoE, gpt-oss, ...)."""
    return list(range(n_layers))


@rule("first_k_dense")
def first_k_dense(config: dict[str, Any], n_layers: int) -> list[int]:
    """DeepSeek/GLM: the first `first_k_dense_replace` layers are dense."""
    first = int(config.get("first_k_dense_replace") or 0)
    return list(range(first, n_layers))


@rule("num_dense_layers")
def num_dense_layers(config: dict[str, Any], n_layers: int) -> list[int]:
    """LFM2-MoE: the first `num_dense_layers` layers are dense."""
    return list(range(int(config.get("num_dense_layers", 2)), n_layers))


@rule("sparse_step")
def sparse_step(config: dict[str, Any], n_layers: int) -> list[int]:
    """Qwen MoE: every `decoder_sparse_step`-th layer, except `mlp_only_layers`."""
    step = int(config.get("decoder_sparse_step") or 1)
    dense = set(config.get("mlp_only_layers") or [])
    return [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]


@rule("ernie_interval")
def ernie_interval(config: dict[str, Any], n_layers: int) -> list[int]:
    """ERNIE 4.5: layers start..end (inclusive) where (i + 1) is a multiple of the interval."""
    start = int(config.get("moe_layer_start_index", 1))
    end = config.get("moe_layer_end_index", -1)
    end = n_layers - 1 if end is None or end == -1 else int(end)
    interval = int(config.get("moe_layer_interval", 1))
    return [i for i in range(n_layers) if start <= i <= end and (i + 1) % interval == 0]


@rule("expert_layer_period")
def expert_layer_period(config: dict[str, Any], n_layers: int) -> list[int]:
    """Jamba: layers whose index modulo `expert_layer_period` equals `expert_layer_offset`."""
    period = int(config.get("expert_layer_period", 2))
    offset = int(config.get("expert_layer_offset", 1))
    return [i for i in range(n_layers) if i % period == offset]


@rule("moe_layers_list")
def moe_layers_list(config: dict[str, Any], n_layers: int) -> list[int]:
    """Llama 4: an explicit `moe_layers` list, else every `interleave_moe_layer_step`-th layer."""
    if config.get("moe_layers") is not None:
        return sorted(int(i) for i in config["moe_layers"])
    step = int(config.get("interleave_moe_layer_step", 1))
    return list(range(step - 1, n_layers, step))


@rule("derived")
def derived(config: dict[str, Any], n_layers: int) -> list[int]:
    """Families without a row: the layers that get an experts module when transformers builds the config."""
    from moe_prune.architectures.derive_structure import moe_layers_of  # builds models: import only when needed

    return moe_layers_of(config)
