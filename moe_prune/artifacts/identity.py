"""Which model an artifact belongs to: the identity block shared by masks, stats and checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moe_prune.artifacts.common import require_int, require_layer_key, require_type
from moe_prune.errors import MoePruneError


@dataclass(frozen=True)
class ModelIdentity:
    """model_type, layer count, routed experts per MoE layer, and a fingerprint of the config.

    `original_ids[L]` says which expert of the ORIGINAL (never pruned) model each current slot
    holds, so artifacts of a pruned model still speak original ids.
    """

    model_type: str
    num_layers: int
    original_ids: dict[int, tuple[int, ...]]
    fingerprint: str

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self.original_ids)

    def experts_in(self, layer: int) -> int:
        return len(self.original_ids[layer])

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "experts_per_layer": {str(k): len(v) for k, v in sorted(self.original_ids.items())},
            "original_ids": {str(k): list(v) for k, v in sorted(self.original_ids.items())},
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_dict(cls, obj: Any, name: str) -> ModelIdentity:
        """Read the block strictly: it comes from files other people made."""
        block = require_type(obj, dict, name, "model identity block ('model')")
        missing = [
            k
            for k in ("model_type", "num_layers", "original_ids", "experts_per_layer", "fingerprint")
            if k not in block
        ]
        if missing:
            raise MoePruneError(f"{name}: model identity block lacks {', '.join(missing)}")
        model_type = require_type(block["model_type"], str, name, "model.model_type")
        num_layers = require_int(block["num_layers"], name, "model.num_layers", minimum=1)
        fingerprint = require_type(block["fingerprint"], str, name, "model.fingerprint")
        ids = {
            layer: _expert_ids(value, name, f"model.original_ids[{layer}]")
            for layer, value in _layer_map(block["original_ids"], num_layers, name, "model.original_ids").items()
        }
        counts = {
            layer: require_int(value, name, f"model.experts_per_layer[{layer}]")
            for layer, value in _layer_map(
                block["experts_per_layer"], num_layers, name, "model.experts_per_layer"
            ).items()
        }
        if counts != {k: len(v) for k, v in ids.items()}:
            raise MoePruneError(f"{name}: experts_per_layer disagrees with original_ids")
        return cls(model_type, num_layers, ids, fingerprint)

    def require_same(self, other: ModelIdentity, name: str, other_name: str) -> None:
        """Refuse an artifact made for another model, saying what differs."""
        if self.model_type != other.model_type:
            raise MoePruneError(f"{name} is for a {self.model_type} model but {other_name} is {other.model_type}")
        if self.num_layers != other.num_layers:
            raise MoePruneError(f"{name} is for {self.num_layers} layers but {other_name} has {other.num_layers}")
        if self.moe_layers != other.moe_layers:
            raise MoePruneError(f"{name} has MoE layers {self.moe_layers} but {other_name} has {other.moe_layers}")
        for layer in self.moe_layers:
            if self.original_ids[layer] != other.original_ids[layer]:
                raise MoePruneError(
                    f"{name} expects {self.experts_in(layer)} experts in layer {layer} "
                    f"but {other_name} has {other.experts_in(layer)} (or holds other original experts)"
                )
        if self.fingerprint != other.fingerprint:
            raise MoePruneError(
                f"{name} was made for a model with config fingerprint {self.fingerprint}, "
                f"{other_name} has {other.fingerprint}"
            )


def _layer_map(value: Any, num_layers: int, name: str, where: str) -> dict[int, Any]:
    """A non-empty object of layer number -> value, every layer below `num_layers`."""
    block = require_type(value, dict, name, where)
    if not block:
        raise MoePruneError(f"{name}: {where} lists no MoE layer")
    layers = {require_layer_key(key, name, where): item for key, item in block.items()}
    beyond = sorted(layer for layer in layers if layer >= num_layers)
    if beyond:
        raise MoePruneError(f"{name}: {where} names layer {beyond[0]} of a model with {num_layers} layers")
    return layers


def _expert_ids(value: Any, name: str, where: str) -> tuple[int, ...]:
    """A non-empty list of distinct non-negative integer expert ids."""
    ids = tuple(require_int(i, name, where, minimum=0) for i in require_type(value, list, name, where))
    if not ids:
        raise MoePruneError(f"{name}: {where} is empty")
    if len(set(ids)) != len(ids):
        raise MoePruneError(f"{name}: {where} lists an expert twice")
    return ids
