"""`moe-prune score --model M --explain`: how moe-prune reads M's architecture, and what it had to assume.

A hand-written table row, or an adapter derived from transformers' own modules; a derivation that could not
read something (the routing rule, say) says so in its notes, which also warn whenever the family is used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moe_prune.architectures import ADAPTERS, derivation_notes
from moe_prune.checkpoint.source import Checkpoint


@dataclass(frozen=True)
class Explanation:
    """Where the adapter of a checkpoint's MoE text model comes from, its fields and the derivation's notes."""

    model: str
    model_type: str
    source: str  # "table" or "derived"
    adapter: dict[str, Any]
    notes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def explain(model: str | Path) -> Explanation:
    """The explanation of `model`'s architecture (folder, hub id or `demo`)."""
    config = Checkpoint.open(model).config
    model_type = str(config.text.get("model_type") or config.model_type)
    source = "table" if model_type in ADAPTERS else "derived"
    return Explanation(str(model), model_type, source, asdict(config.adapter), derivation_notes(model_type))
