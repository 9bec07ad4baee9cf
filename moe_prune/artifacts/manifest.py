"""moe_prune.json, written beside every output checkpoint: lineage in ORIGINAL expert ids."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_prune import __version__
from moe_prune.artifacts.common import check_header, dump_json, read_json

MANIFEST_NAME = "moe_prune.json"
MANIFEST_SCHEMA = "moe-prune/checkpoint"
MANIFEST_VERSION = 1


@dataclass
class Manifest:
    """`slots[L][j]` is the original expert id held by slot j of layer L; `history` lists the edits."""

    slots: dict[int, tuple[int, ...]]
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": MANIFEST_SCHEMA,
            "version": MANIFEST_VERSION,
            "tool_version": __version__,
            "layers": {str(k): {"slots": list(v)} for k, v in sorted(self.slots.items())},
            "history": self.history,
        }

    def write(self, folder: Path) -> None:
        (folder / MANIFEST_NAME).write_text(dump_json(self.to_dict()))

    @classmethod
    def read(cls, folder: Path) -> Manifest | None:
        """The manifest of a checkpoint folder, or None for a checkpoint moe-prune never touched."""
        path = folder / MANIFEST_NAME
        if not path.exists():
            return None
        obj, name = read_json(path, "checkpoint manifest")
        check_header(obj, MANIFEST_SCHEMA, MANIFEST_VERSION, name)
        try:
            slots = {int(k): tuple(int(i) for i in v["slots"]) for k, v in obj["layers"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            from moe_prune.errors import MoePruneError

            raise MoePruneError(f"{name}: malformed layers block ({exc!r})") from None
        return cls(slots, list(obj.get("history") or []))
