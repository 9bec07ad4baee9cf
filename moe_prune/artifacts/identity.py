"""Which model an artifact belongs to: the identity block shared by masks, stats and checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
        try:
            ids = {int(k): tuple(int(i) for i in v) for k, v in obj["original_ids"].items()}
            counts = {int(k): int(v) for k, v in obj["experts_per_layer"].items()}
            ident = cls(str(obj["model_type"]), int(obj["num_layers"]), ids, str(obj["fingerprint"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MoePruneError(f"{name}: malformed model identity block ({exc!r})") from None
        if counts != {k: len(v) for k, v in ids.items()}:
            raise MoePruneError(f"{name}: experts_per_layer disagrees with original_ids")
        return ident

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
