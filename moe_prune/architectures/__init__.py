"""Architecture registry: `get_adapter(model_type)` answers everything family-specific."""

from __future__ import annotations

import difflib

from moe_prune.architectures.layer_rules import LAYER_RULES
from moe_prune.architectures.spec import Adapter, Routing
from moe_prune.architectures.table import ROWS
from moe_prune.errors import MoePruneError

ADAPTERS: dict[str, Adapter] = {}
for _row in ROWS:
    if _row.model_type in ADAPTERS:
        raise ValueError(f"architecture {_row.model_type!r} listed twice")
    if _row.moe_layers not in LAYER_RULES:
        raise ValueError(f"architecture {_row.model_type!r} names unknown layer rule {_row.moe_layers!r}")
    ADAPTERS[_row.model_type] = _row


def supported_model_types() -> list[str]:
    """Model types with an adapter, sorted."""
    return sorted(ADAPTERS)


def get_adapter(model_type: str) -> Adapter:
    """The adapter for `model_type`, or a one-line error that lists what is supported."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        close = difflib.get_close_matches(model_type, ADAPTERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise MoePruneError(
            f"unsupported model_type {model_type!r}{hint}; supported: {', '.join(supported_model_types())}. "
            "Add a row to moe_prune/architectures/table.py to support it."
        ) from None


__all__ = ["ADAPTERS", "LAYER_RULES", "Adapter", "Routing", "get_adapter", "supported_model_types"]
