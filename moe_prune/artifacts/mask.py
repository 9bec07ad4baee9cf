"""The drop mask: per MoE layer which experts to keep and drop, in ORIGINAL expert ids.

A layer entry may also carry `top_k`, the experts each token uses there (`allocate --top-k search`); masks
without it (every earlier one) leave top-k as the model has it, clipped to the kept experts.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_prune import __version__
from moe_prune.artifacts.common import check_header, dump_json, read_json, require_int, require_layer_key, require_type
from moe_prune.artifacts.identity import ModelIdentity
from moe_prune.errors import MoePruneError

MASK_SCHEMA = "moe-prune/mask"
MASK_VERSION = 1


@dataclass
class DropMask:
    """Kept original expert ids per MoE layer; dropped = the model's ids minus the kept ones."""

    model: ModelIdentity
    keep: dict[int, tuple[int, ...]]
    provenance: dict[str, Any] = field(default_factory=dict)
    top_k: dict[int, int] | None = None  # experts per token per MoE layer; None: the model's, clipped to the kept

    def drop(self, layer: int) -> tuple[int, ...]:
        return tuple(i for i in self.model.original_ids[layer] if i not in set(self.keep[layer]))

    @property
    def is_uniform(self) -> bool:
        return len({len(v) for v in self.keep.values()}) <= 1

    @classmethod
    def create(
        cls,
        model: ModelIdentity,
        keep: dict[int, list[int]],
        criterion: str,
        params: dict[str, Any] | None = None,
        top_k: dict[int, int] | None = None,
    ) -> DropMask:
        """Build a validated mask with provenance (criterion, parameters, tool version, time)."""
        provenance = {
            "criterion": criterion,
            "params": params or {},
            "tool_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        mask = cls(model, {k: tuple(sorted(v)) for k, v in keep.items()}, provenance, top_k)
        mask.validate("mask")
        return mask

    def validate(self, name: str) -> None:
        """Every MoE layer listed, ids known to the model, at least one expert kept per layer."""
        if sorted(self.keep) != self.model.moe_layers:
            raise MoePruneError(
                f"{name}: lists layers {sorted(self.keep)} but the model's MoE layers are {self.model.moe_layers}"
            )
        for layer, kept in self.keep.items():
            present = set(self.model.original_ids[layer])
            unknown = sorted(set(kept) - present)
            if unknown:
                raise MoePruneError(
                    f"{name}: layer {layer} keeps experts {unknown} that the model does not have "
                    f"(it has original ids {sorted(present)})"
                )
            if len(set(kept)) != len(kept):
                raise MoePruneError(f"{name}: layer {layer} lists an expert twice")
            if not kept:
                raise MoePruneError(f"{name}: layer {layer} drops every expert; keep at least one")
        if self.top_k is not None:
            self._validate_top_k(name)

    def _validate_top_k(self, name: str) -> None:
        """Per-layer top-k: every MoE layer listed, from 1 to the experts that layer keeps."""
        assert self.top_k is not None
        if sorted(self.top_k) != sorted(self.keep):
            raise MoePruneError(f"{name}: top_k is given for layers {sorted(self.top_k)}, not every MoE layer")
        for layer, k in self.top_k.items():
            if not 1 <= k <= len(self.keep[layer]):
                raise MoePruneError(
                    f"{name}: layer {layer} top_k {k} must be from 1 to the {len(self.keep[layer])} experts it keeps"
                )

    def validate_groups(self, n_group: int, name: str) -> None:
        """Grouped routers stay the same model only with equal drops per group and >= 2 kept per group."""
        if n_group <= 1:
            return
        for layer, kept in self.keep.items():
            ids = self.model.original_ids[layer]
            if len(ids) % n_group:
                raise MoePruneError(
                    f"{name}: layer {layer} has {len(ids)} experts, not divisible into {n_group} groups"
                )
            size = len(ids) // n_group
            per_group = [
                sum(1 for slot in range(g * size, (g + 1) * size) if ids[slot] in kept) for g in range(n_group)
            ]
            if len(set(per_group)) != 1 or per_group[0] < 2:
                raise MoePruneError(
                    f"{name}: layer {layer} keeps {per_group} experts in its {n_group} routing groups; grouped routing "
                    "needs the same number kept in every group and at least 2 per group"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": MASK_SCHEMA,
            "version": MASK_VERSION,
            "model": self.model.to_dict(),
            "layers": {
                str(layer): {
                    "keep": list(self.keep[layer]),
                    "drop": list(self.drop(layer)),
                    **({"top_k": self.top_k[layer]} if self.top_k is not None else {}),
                }
                for layer in sorted(self.keep)
            },
            "provenance": self.provenance,
        }

    def dumps(self) -> str:
        return dump_json(self.to_dict())

    @classmethod
    def from_dict(cls, obj: dict[str, Any], name: str) -> DropMask:
        check_header(obj, MASK_SCHEMA, MASK_VERSION, name)
        model = ModelIdentity.from_dict(obj.get("model"), name)
        layers = obj.get("layers")
        if not isinstance(layers, dict):
            raise MoePruneError(f"{name}: 'layers' must be an object of layer -> {{keep, drop}}")
        keep: dict[int, tuple[int, ...]] = {}
        top_k: dict[int, int] = {}
        for key, entry in layers.items():
            layer = require_layer_key(key, name, "layers")
            if layer not in model.original_ids:
                raise MoePruneError(f"{name}: layer {key!r} is not an MoE layer of the model")
            keep[layer] = _kept(layer, require_type(entry, dict, name, f"layers[{key}]"), model, name)
            if "top_k" in entry:
                top_k[layer] = require_int(entry["top_k"], name, f"layers[{layer}].top_k", minimum=1)
        provenance = obj.get("provenance")
        provenance = require_type(provenance, dict, name, "provenance") if provenance is not None else {}
        mask = cls(model, keep, provenance, top_k or None)
        mask.validate(name)
        return mask

    @classmethod
    def read(cls, source: str | Path) -> DropMask:
        obj, name = read_json(source, "mask")
        return cls.from_dict(obj, name)


def _ids(entry: dict[str, Any], field: str, layer: int, name: str) -> list[int] | None:
    """The `keep` or `drop` list of a layer entry: integer ids, strictly (not 1.0, true or "1")."""
    if field not in entry:
        return None
    where = f"layers[{layer}].{field}"
    return [require_int(i, name, where) for i in require_type(entry[field], list, name, where)]


def _kept(layer: int, entry: dict[str, Any], model: ModelIdentity, name: str) -> tuple[int, ...]:
    """Kept ids of one layer entry, from `keep`, or from `drop` when `keep` is absent."""
    unknown = sorted(set(entry) - {"keep", "drop", "top_k"})
    if unknown:
        raise MoePruneError(
            f"{name}: layers[{layer}] has unknown field {unknown[0]!r} (expected keep and drop, optionally top_k)"
        )
    kept, dropped = _ids(entry, "keep", layer, name), _ids(entry, "drop", layer, name)
    if kept is None and dropped is None:
        raise MoePruneError(f"{name}: layers[{layer}] has neither keep nor drop")
    present = model.original_ids[layer]
    if dropped is not None and len(set(dropped)) != len(dropped):
        raise MoePruneError(f"{name}: layer {layer} drops an expert twice")
    if kept is None:
        unknown_ids = sorted(set(dropped or []) - set(present))
        if unknown_ids:
            raise MoePruneError(f"{name}: layer {layer} drops experts {unknown_ids} that the model does not have")
        return tuple(i for i in present if i not in set(dropped or []))
    if dropped is not None and (set(kept) & set(dropped) or (set(kept) | set(dropped) != set(present) and dropped)):
        raise MoePruneError(f"{name}: layer {layer} keep and drop lists do not partition its experts")
    return tuple(kept)
