"""The `moe_prune_ragged` block of a config.json, checked before an engine builds a layer from it.

Checkpoints come from strangers (see README "Safety"): a damaged block (a count past the config's experts, a
top-k past a layer's count, a missing layer, a string or negative value) must stop the engine with one line
naming the config and the field, not an assertion deep in vLLM's weight loader. Pure: no vLLM imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moe_prune.architectures.config import RAGGED_KEY, ModelConfig
from moe_prune.checkpoint.ragged import RAGGED_FORMAT
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.errors import MoePruneError


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _keys(spec: dict[str, Any], name: str, config: ModelConfig) -> list[str]:
    """A non-empty list of config fields that each hold a number (the fields the engine reads per layer)."""
    keys = spec.get(name)
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
        raise MoePruneError(f"{config.source}: {RAGGED_KEY}.{name} must be a non-empty list of config field names")
    for key in keys:
        if not _is_count(config.get(key)):
            raise MoePruneError(f"{config.source}: {RAGGED_KEY}.{name} names {key!r}, which holds no number")
    return keys


def check_block(config: ModelConfig) -> dict[str, Any]:
    """The ragged block of `config`, every field an engine reads checked; MoePruneError naming the field if not."""
    spec = config.ragged
    if spec is None:
        raise MoePruneError(f"{config.source}: no {RAGGED_KEY} object; is this a ragged moe-prune checkpoint?")
    if spec.get("format") != RAGGED_FORMAT:
        raise MoePruneError(
            f"{config.source}: {RAGGED_KEY}.format is {spec.get('format')!r}; this moe-prune reads {RAGGED_FORMAT}"
        )
    if not isinstance(spec.get("base_class"), str):
        raise MoePruneError(f"{config.source}: {RAGGED_KEY}.base_class must be a class name")
    counts = config.experts_per_layer  # moe-prune's own reader: layers, numbers, 1 to the config's expert count
    _keys(spec, "count_keys", config)
    _keys(spec, "top_k_keys", config)
    listed = spec.get("top_k_per_layer")
    if not isinstance(listed, dict) or sorted(listed) != sorted(str(layer) for layer in counts):
        raise MoePruneError(
            f"{config.source}: {RAGGED_KEY}.top_k_per_layer must list the layers experts_per_layer lists "
            f"({sorted(counts)})"
        )
    for layer, count in counts.items():
        top_k = listed[str(layer)]
        if not _is_count(top_k) or not 1 <= top_k <= count:
            raise MoePruneError(
                f"{config.source}: {RAGGED_KEY}.top_k_per_layer[{str(layer)!r}] is {top_k!r}; "
                f"expected 1 to that layer's {count} experts"
            )
    return {**spec, "experts_per_layer": {str(k): v for k, v in counts.items()}}


def read_block(folder: str, fallback: dict[str, Any]) -> dict[str, Any]:
    """The checked block of the checkpoint `folder`, or of `fallback` (the engine's parsed config as a dict)
    where the folder is not local (a hub name).

    A local folder is opened with moe-prune's own checkpoint reader first (files inside the folder, index and
    shard headers, config against the weights, generation config), as every command opens a model: the engine
    reads the same files, and a damaged one must stop it with one line naming the file, not deep in its loader.
    """
    if Path(folder).is_dir():
        return check_block(Checkpoint.open(folder).config)
    return check_block(ModelConfig.from_dict(fallback, f"{folder}: config.json"))
