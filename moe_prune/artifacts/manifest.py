"""moe_prune.json, written beside every output checkpoint: lineage in ORIGINAL expert ids.

Version 1 lists, per MoE layer, the original expert each slot holds (`slots`). Version 2 adds an
optional `members` list per layer for merged checkpoints: which original experts were averaged
into each slot, with their weights; `slots` then names each slot's anchor, so identity checks
and a later prune keep working. A manifest without merged layers is still written as version 1.

An optional `mtp` block (no version change: older manifests simply lack it) records what became of
the multi-token-prediction layers: per MTP layer index, its on-disk prefix, the decoder MoE layer
whose selection or merge plan it got (`follows`) and, like a decoder layer, its slots and members;
`dropped` counts MTP layers removed by `--drop-mtp`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_prune import __version__
from moe_prune.artifacts.common import check_header, dump_json, read_json, require_int, require_layer_key, require_type
from moe_prune.errors import MoePruneError

MANIFEST_NAME = "moe_prune.json"
MANIFEST_SCHEMA = "moe-prune/checkpoint"
MANIFEST_VERSION = 2
WEIGHT_TOLERANCE = 1e-6

# members[L][j] = ((original id, weight), ...) of slot j; the weights of a slot sum to 1.
Members = tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class MtpRecord:
    """One MTP layer's MoE block: it holds the same original experts as decoder layer `follows`."""

    prefix: str  # on-disk key prefix, e.g. "model.layers.61." or "mtp.layers.0."
    follows: int
    slots: tuple[int, ...]
    members: tuple[Members, ...] | None = None  # merged slots (as the followed layer's)

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"prefix": self.prefix, "follows": self.follows, "slots": list(self.slots)}
        if self.members is not None:
            entry["members"] = [[{"id": i, "weight": w} for i, w in slot] for slot in self.members]
        return entry


@dataclass
class Manifest:
    """`slots[L][j]` is the original expert id held by slot j of layer L; `history` lists the edits.

    `merged[L][j]`, for merged layers only, lists the original experts averaged into slot j and their
    weights; `slots[L][j]` is then that slot's anchor (the member the others were aligned to).
    """

    slots: dict[int, tuple[int, ...]]
    history: list[dict[str, Any]] = field(default_factory=list)
    merged: dict[int, tuple[Members, ...]] = field(default_factory=dict)
    mtp: dict[int, MtpRecord] = field(default_factory=dict)  # MTP layer index -> its MoE lineage
    mtp_dropped: int = 0  # MTP layers removed (--drop-mtp)

    def members(self, layer: int) -> tuple[Members, ...]:
        """Each slot's original experts and weights (a kept, unmerged expert is itself with weight 1)."""
        if layer in self.merged:
            return self.merged[layer]
        return tuple(((orig, 1.0),) for orig in self.slots[layer])

    def to_dict(self) -> dict[str, Any]:
        layers: dict[str, Any] = {}
        for layer, ids in sorted(self.slots.items()):
            entry: dict[str, Any] = {"slots": list(ids)}
            if layer in self.merged:
                entry["members"] = [[{"id": i, "weight": w} for i, w in slot] for slot in self.merged[layer]]
            layers[str(layer)] = entry
        out = {
            "schema": MANIFEST_SCHEMA,
            "version": MANIFEST_VERSION if self.merged or any(r.members for r in self.mtp.values()) else 1,
            "tool_version": __version__,
            "layers": layers,
            "history": self.history,
        }
        if self.mtp or self.mtp_dropped:
            out["mtp"] = {
                "layers": {str(i): record.to_dict() for i, record in sorted(self.mtp.items())},
                "dropped": self.mtp_dropped,
            }
        return out

    def write(self, folder: Path) -> None:
        self.validate(str(folder / MANIFEST_NAME))
        (folder / MANIFEST_NAME).write_text(dump_json(self.to_dict()))

    def validate(self, name: str) -> None:
        """Merged layers: one member list per slot, the anchor among them, ids used once, weights summing to 1."""
        for layer, slots in self.merged.items():
            ids = self.slots.get(layer)
            if ids is None or len(slots) != len(ids):
                raise MoePruneError(f"{name}: layer {layer} lists members for {len(slots)} slots, slots for {ids}")
            seen: set[int] = set()
            for anchor, members in zip(ids, slots, strict=True):
                orig = [i for i, _ in members]
                weights = [w for _, w in members]
                if anchor not in orig or seen & set(orig) or len(set(orig)) != len(orig):
                    raise MoePruneError(f"{name}: layer {layer} slot of expert {anchor} has inconsistent members")
                if min(weights) < 0 or not math.isclose(sum(weights), 1.0, abs_tol=WEIGHT_TOLERANCE):
                    raise MoePruneError(f"{name}: layer {layer} slot of expert {anchor} has weights not summing to 1")
                seen |= set(orig)
        for index, record in self.mtp.items():
            if self.slots.get(record.follows) != record.slots or self.merged.get(record.follows) != record.members:
                raise MoePruneError(
                    f"{name}: MTP layer {index} does not hold the experts of layer {record.follows}, which it follows"
                )

    @classmethod
    def read(cls, folder: Path) -> Manifest | None:
        """The manifest of a checkpoint folder, or None for a checkpoint moe-prune never touched."""
        path = folder / MANIFEST_NAME
        if not path.exists():
            return None
        obj, name = read_json(path, "checkpoint manifest")
        check_header(obj, MANIFEST_SCHEMA, MANIFEST_VERSION, name)
        layers = require_type(obj.get("layers"), dict, name, "layers")
        slots: dict[int, tuple[int, ...]] = {}
        merged: dict[int, tuple[Members, ...]] = {}
        for key, value in layers.items():
            layer = require_layer_key(key, name, "layers")
            entry = require_type(value, dict, name, f"layers[{key}]")
            where = f"layers[{key}].slots"
            ids = [require_int(i, name, where, minimum=0) for i in require_type(entry.get("slots"), list, name, where)]
            if not ids or len(set(ids)) != len(ids):
                raise MoePruneError(f"{name}: {where} must list distinct original expert ids")
            slots[layer] = tuple(ids)
            if "members" in entry:
                merged[layer] = _members(entry["members"], name, f"layers[{key}].members")
        history = obj.get("history")
        mtp, dropped = _mtp(obj.get("mtp"), name)
        history_list = require_type(history, list, name, "history") if history is not None else []
        manifest = cls(slots, history_list, merged, mtp, dropped)
        manifest.validate(name)
        return manifest


def _mtp(value: Any, name: str) -> tuple[dict[int, MtpRecord], int]:
    """The optional `mtp` block: per MTP layer index its prefix, followed layer, slots (and members)."""
    if value is None:
        return {}, 0
    block = require_type(value, dict, name, "mtp")
    dropped = require_int(block.get("dropped", 0), name, "mtp.dropped", minimum=0)
    records: dict[int, MtpRecord] = {}
    for key, item in require_type(block.get("layers", {}), dict, name, "mtp.layers").items():
        index = require_layer_key(key, name, "mtp.layers")
        entry = require_type(item, dict, name, f"mtp.layers[{key}]")
        prefix = require_type(entry.get("prefix"), str, name, f"mtp.layers[{key}].prefix")
        follows = require_int(entry.get("follows"), name, f"mtp.layers[{key}].follows", minimum=0)
        where = f"mtp.layers[{key}].slots"
        ids = [require_int(i, name, where, minimum=0) for i in require_type(entry.get("slots"), list, name, where)]
        if not ids or len(set(ids)) != len(ids):
            raise MoePruneError(f"{name}: {where} must list distinct original expert ids")
        members = _members(entry["members"], name, f"mtp.layers[{key}].members") if "members" in entry else None
        records[index] = MtpRecord(prefix, follows, tuple(ids), members)
    return records, dropped


def _members(value: Any, name: str, where: str) -> tuple[Members, ...]:
    """Per slot, the list of {id, weight} merged into it: integer ids, finite numeric weights."""
    slots = []
    for slot in require_type(value, list, name, where):
        members = []
        for member in require_type(slot, list, name, where):
            member = require_type(member, dict, name, f"{where} entry")
            weight = member.get("weight")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise MoePruneError(f"{name}: {where} weight must be a finite number, not {weight!r}")
            members.append((require_int(member.get("id"), name, f"{where} id", minimum=0), float(weight)))
        if not members:
            raise MoePruneError(f"{name}: {where} has a slot without members")
        slots.append(tuple(members))
    return tuple(slots)
