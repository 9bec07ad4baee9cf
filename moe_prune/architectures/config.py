"""A model's config.json seen through its adapter: expert counts, top-k, MoE layers, edits."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_prune.architectures import ADAPTERS, Adapter, find_adapter, get_adapter, wrapper_adapter
from moe_prune.architectures.activations import check_activations
from moe_prune.architectures.config_checks import check_sizes, check_transformers_reads
from moe_prune.architectures.config_values import (
    check_named_choices,
    check_positive_numbers,
    check_probabilities,
    check_token_ids,
)
from moe_prune.architectures.layer_rules import LAYER_RULES
from moe_prune.artifacts.common import is_int, read_json
from moe_prune.errors import MoePruneError

# Fields that change without changing the model's weights or shapes.
_VOLATILE = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures", "auto_map", "use_cache"}
TEXT_CONFIG_KEYS = ("text_config", "language_config", "llm_config")
# config.json block that marks a checkpoint with different expert counts per MoE layer (see checkpoint/ragged.py).
RAGGED_KEY = "moe_prune_ragged"
# Larger counts are no real model's: a config that claims them is corrupt (and would size huge buffers).
MAX_EXPERTS = 1 << 16
MAX_LAYERS = 1 << 16


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        d = d[part]
    d[last] = value


def _wrapped(model_type: str | None, text: Adapter) -> Adapter:
    """A wrapper's text adapter with the wrapper's own layer prefixes (transformers knows the wrapper type)."""
    return wrapper_adapter(model_type, text) if model_type else text


@dataclass
class ModelConfig:
    """The raw config dict plus where its MoE text model lives and which adapter reads it."""

    raw: dict[str, Any]
    adapter: Adapter
    text_key: str | None = None  # e.g. "text_config" for multimodal wrappers
    source: str = "config.json"

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Find the adapter for the top-level model_type or for a nested text config."""
        model_type = raw.get("model_type")
        if model_type is not None and not isinstance(model_type, str):
            raise MoePruneError(f"{source}: model_type is {model_type!r}, not a string")
        if model_type in ADAPTERS:
            return cls(raw, ADAPTERS[model_type], None, source)
        for key in TEXT_CONFIG_KEYS:
            sub = raw.get(key)
            if isinstance(sub, dict) and isinstance(sub.get("model_type"), str) and sub["model_type"] in ADAPTERS:
                return cls(raw, _wrapped(model_type, ADAPTERS[sub["model_type"]]), key, source)
        for key, sub in [(None, raw)] + [(k, raw.get(k)) for k in TEXT_CONFIG_KEYS]:  # no table row: derive
            derived = (
                find_adapter(sub["model_type"])
                if isinstance(sub, dict) and isinstance(sub.get("model_type"), str)
                else None
            )
            if derived is not None:
                return cls(raw, _wrapped(model_type, derived) if key else derived, key, source)
        if not model_type:
            raise MoePruneError(f"{source}: no model_type field; is this a transformers model folder?")
        try:
            get_adapter(model_type)
        except MoePruneError as exc:  # the 'unsupported' error with the list; say which file asked
            raise MoePruneError(f"{source}: {exc}") from exc
        raise AssertionError("unreachable")

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        """Read, parse and check config.json: a one-line error naming it before any model is built from it."""
        raw, _ = read_json(path, "config")  # the one strict JSON reader: object, no duplicate keys, no NaN
        config = cls.from_dict(raw, str(path))
        config.check()
        check_transformers_reads(raw, str(path))
        check_activations(raw, str(path))
        return config

    def check(self) -> None:
        """Read every MoE field once, so a nonsensical value fails here with one line, not deep in a stage."""
        _ = self.num_layers, self.top_k, self.experts_per_layer, self.n_group  # their own, more precise lines first
        prefix = f"{self.text_key}." if self.text_key else ""
        check_sizes(self.text, self.source, prefix)
        check_token_ids(self.text, self.source, self.text.get("vocab_size"), prefix)
        check_positive_numbers(self.text, self.source, prefix)
        check_probabilities(self.text, self.source, prefix)
        check_named_choices(self.raw, self.source)
        if self.text_key:
            check_named_choices(self.text, self.source, prefix)
        if not self.moe_layers:
            raise MoePruneError(f"{self.source}: describes no MoE layer; nothing to prune or merge")
        if self.n_group > 1 and any(n % self.n_group for n in self.experts_per_layer.values()):
            raise MoePruneError(
                f"{self.source}: n_group {self.n_group} does not divide the routed experts "
                f"{sorted(set(self.experts_per_layer.values()))}"
            )

    @property
    def text(self) -> dict[str, Any]:
        """The dict holding the MoE fields (the text config of a multimodal wrapper)."""
        return self.raw[self.text_key] if self.text_key else self.raw

    @property
    def model_type(self) -> str:
        return self.adapter.model_type

    def get(self, dotted: str) -> Any:
        return _get(self.text, dotted)

    def first(self, keys: tuple[str, ...]) -> Any:
        """Value of the first key present (aliases are listed in priority order)."""
        for key in keys:
            value = self.get(key)
            if value is not None:
                return value
        return None

    @property
    def num_layers(self) -> int:
        value = self.get(self.adapter.layer_count_key)
        if isinstance(value, list):  # a per-layer type list sizes the model (nemotron_h's layers_block_type)
            value = len(value)
        if not is_int(value) or not 1 <= value <= MAX_LAYERS:
            raise MoePruneError(
                f"{self.source}: {self.adapter.layer_count_key} is {value!r}; expected 1 to {MAX_LAYERS} layers"
            )
        return value

    @property
    def num_experts(self) -> int:
        value = self.first(self.adapter.expert_count_keys)
        if not is_int(value) or not 1 <= value <= MAX_EXPERTS:
            keys = " / ".join(self.adapter.expert_count_keys)
            raise MoePruneError(
                f"{self.source}: routed-expert count ({keys}) is {value!r}; expected 1 to {MAX_EXPERTS}"
            )
        return value

    @property
    def ragged(self) -> dict[str, Any] | None:
        """The per-layer expert-count block moe-prune writes for non-uniform checkpoints, or None."""
        block = self.text.get(RAGGED_KEY)
        return block if isinstance(block, dict) else None

    @property
    def experts_per_layer(self) -> dict[int, int]:
        """Routed experts of every MoE layer: the ragged block's list, else the config count everywhere.

        In a ragged checkpoint the expert-count keys hold the largest count; the list sizes each layer.
        """
        if self.ragged is None:
            return {layer: self.num_experts for layer in self.moe_layers}
        listed = self.ragged.get("experts_per_layer")
        try:
            counts = {int(k): v for k, v in listed.items()}
        except (AttributeError, TypeError, ValueError):
            counts = {}
        if not counts or not all(is_int(v) for v in counts.values()):
            raise MoePruneError(f"{self.source}: {RAGGED_KEY}.experts_per_layer must map layer -> count")
        if sorted(counts) != self.moe_layers:
            raise MoePruneError(
                f"{self.source}: {RAGGED_KEY}.experts_per_layer lists layers {sorted(counts)} "
                f"but the MoE layers are {self.moe_layers}"
            )
        if any(n <= 0 or n > self.num_experts for n in counts.values()):
            raise MoePruneError(
                f"{self.source}: {RAGGED_KEY}.experts_per_layer counts must be between 1 and the "
                f"config's expert count {self.num_experts}"
            )
        if max(counts.values()) != self.num_experts:  # as checkpoint.ragged writes it (the docstring above)
            raise MoePruneError(
                f"{self.source}: routed-expert count is {self.num_experts}, but the largest layer of "
                f"{RAGGED_KEY}.experts_per_layer holds {max(counts.values())}; a ragged config keeps the largest"
            )
        return counts

    def experts_in_layer(self, layer: int) -> int:
        """Routed experts of MoE layer `layer` (per-layer in ragged checkpoints)."""
        return self.experts_per_layer[layer]

    def top_k_in_layer(self, layer: int) -> int:
        """Experts each token uses in `layer`: top-k, clipped to the experts the layer has."""
        return min(self.top_k, self.experts_in_layer(layer))

    @property
    def top_k(self) -> int:
        """Experts each token uses (in a ragged checkpoint, in its largest layers); from 1 to the expert count."""
        value = self.first(self.adapter.top_k_keys)
        keys = " / ".join(self.adapter.top_k_keys)
        if not is_int(value) or value < 1:
            raise MoePruneError(f"{self.source}: top-k ({keys}) is {value!r}; expected at least 1")
        if value > self.num_experts:
            raise MoePruneError(
                f"{self.source}: top-k ({keys}) is {value}, above the {self.num_experts} routed experts"
            )
        return value

    @property
    def moe_layers(self) -> list[int]:
        """Sorted indices of the MoE decoder layers, from the family's rule; one line if the config breaks it."""
        n_layers = self.num_layers
        try:
            layers = LAYER_RULES[self.adapter.moe_layers](self.text, n_layers)
        except (TypeError, ValueError, ZeroDivisionError, AttributeError) as exc:
            raise MoePruneError(f"{self.source}: cannot tell which layers are MoE layers (bad layer fields)") from exc
        if any(not 0 <= layer < n_layers for layer in layers) or len(set(layers)) != len(layers):
            raise MoePruneError(f"{self.source}: MoE layers {layers} are not distinct layers of the {n_layers}")
        return layers

    @property
    def router_tail(self) -> int:
        """Router rows after the routed experts' (`Adapter.router_tail`): 0 for most families."""
        tail = self.adapter.router_tail
        value = self.get(tail) if isinstance(tail, str) else tail
        if not is_int(value) or not 0 <= value <= MAX_EXPERTS:
            raise MoePruneError(f"{self.source}: {tail} is {value!r}; expected 0 to {MAX_EXPERTS}")
        return value

    @property
    def n_group(self) -> int:
        """Number of expert groups for group-limited routing (1 when the family has none)."""
        if not self.adapter.routing.grouped:
            return 1
        if self.get("topk_method") == "greedy":
            return 1
        key = self.adapter.group_count_key
        value = self.get(key) or 1
        if not is_int(value) or value < 1:
            raise MoePruneError(f"{self.source}: {key} is {value!r}; expected a positive integer")
        return value

    @property
    def shared_experts(self) -> Any:
        return self.first(self.adapter.shared_expert_keys) if self.adapter.shared_expert_keys else None

    def fingerprint(self) -> str:
        """Hash of the config minus fields that do not change the model (versions, names, dtype)."""
        clean = {k: v for k, v in self.raw.items() if k not in _VOLATILE}
        blob = json.dumps(clean, sort_keys=True, separators=(",", ":"), default=str)
        return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()[:16]

    def with_expert_count(self, count: int, top_k: int) -> ModelConfig:
        """A copy with every expert-count alias present set to `count` and top-k set to `top_k`."""
        raw = copy.deepcopy(self.raw)
        text = raw[self.text_key] if self.text_key else raw
        for key in self.adapter.expert_count_keys:
            if _get(text, key) is not None:
                _set(text, key, count)
        for key in self.adapter.top_k_keys:
            if _get(text, key) is not None:
                _set(text, key, top_k)
        return ModelConfig(raw, self.adapter, self.text_key, self.source)
