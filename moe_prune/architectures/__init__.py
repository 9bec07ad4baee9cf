"""Architecture registry: `get_adapter(model_type)` answers everything family-specific.

A row of the hand-written table wins; any other MoE causal LM of the installed transformers gets
an adapter derived from its own modules (`derive.py`), cached per model_type.
"""

from __future__ import annotations

import difflib
import functools
import re
import warnings
from dataclasses import replace

from moe_prune.architectures.layer_rules import LAYER_RULES
from moe_prune.architectures.spec import Adapter, Routing
from moe_prune.architectures.table import REFUSED, ROWS
from moe_prune.errors import MoePruneError, MoePruneWarning
from moe_prune.registry import Registry

ADAPTERS: Registry[Adapter] = Registry("architecture")
for _row in ROWS:
    if _row.moe_layers not in LAYER_RULES:
        raise ValueError(f"architecture {_row.model_type!r} names unknown layer rule {_row.moe_layers!r}")
    ADAPTERS.add(_row.model_type, _row)

# model_type -> derived adapter, or the one-line reason the derivation failed.
_DERIVED: dict[str, Adapter | str] = {}
# model_type -> what its derivation could not read (e.g. the routing rule), shown when the family is used.
_NOTES: dict[str, tuple[str, ...]] = {}
EXPLAIN_HINT = "`moe-prune score --model M --explain` shows the derivation"


def supported_model_types() -> list[str]:
    """Model types with a table row, sorted (derived ones are found on demand)."""
    return sorted(ADAPTERS)


def derived_adapter(model_type: str) -> Adapter | str:
    """The adapter derived from transformers' modules, or why there is none (cached)."""
    if model_type in REFUSED:
        return REFUSED[model_type]
    if model_type not in _DERIVED:
        from moe_prune.architectures.derive import derive  # imports torch/transformers

        try:
            derived = derive(model_type)
            _DERIVED[model_type], _NOTES[model_type] = derived.adapter, derived.notes
        except Exception as exc:  # DerivationError, or a config class that cannot even be built: not supported
            _DERIVED[model_type] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return _DERIVED[model_type]


def derivation_notes(model_type: str) -> tuple[str, ...]:
    """What the derivation of `model_type` could not read and assumed instead; none for a table row."""
    if model_type in ADAPTERS:
        return ()
    derived_adapter(model_type)
    return _NOTES.get(model_type, ())


def find_adapter(model_type: str) -> Adapter | None:
    """The table row, else the derived adapter, else None (no error: callers try nested configs next).

    A derived adapter with notes warns (one line per note): its results rest on what the note assumes.
    """
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    found = derived_adapter(model_type)
    if not isinstance(found, Adapter):
        return None
    for note in _NOTES.get(model_type, ()):
        message = f"{model_type} (derived from transformers): {note}; {EXPLAIN_HINT}"
        warnings.warn(message, MoePruneWarning, stacklevel=2)
    return found


@functools.cache
def wrapper_adapter(model_type: str, text: Adapter) -> Adapter:
    """The text model's adapter with the layer prefixes of the wrapper `model_type` (multimodal, text_config):
    read off transformers' own classes for it; the text adapter unchanged where transformers cannot build it."""
    from moe_prune.architectures.derive import wrapper_layout  # imports torch/transformers

    try:
        layout = wrapper_layout(model_type)
    except Exception:  # an unknown or unbuildable wrapper: its keys are matched as the text model's
        return text
    return replace(text, layer_prefix=layout.layer_prefix, runtime_layers=layout.runtime_layers)


def fit_layer_prefix(adapter: Adapter, names: list[str]) -> Adapter:
    """`adapter`, or its text model's layout under a wrapper's layer prefix when only that one names a router.

    A wrapper loaded as a causal LM and saved again (finetune, or any `save_pretrained`) writes its text config
    over the wrapper's keys: Qwen3.5-MoE's text config with model.language_model.layers.{L}. tensors. The
    wrappers of the text model type are transformers' own (`derive.wrapper_layout`); none match: unchanged."""
    if _names_router(adapter, names):
        return adapter
    from moe_prune.architectures.derive import wrapper_layout
    from moe_prune.architectures.derive_models import moe_causal_lm_types, text_model_type

    for wrapper in moe_causal_lm_types():
        try:
            if wrapper == adapter.model_type or text_model_type(wrapper) != adapter.model_type:
                continue
            fitted = replace(adapter, layer_prefix=wrapper_layout(wrapper).layer_prefix)
        except Exception:  # a wrapper transformers cannot build: not this checkpoint's layout
            continue
        if _names_router(fitted, names):
            return fitted
    return adapter


def _names_router(adapter: Adapter, names: list[str]) -> bool:
    """Does any tensor name a router weight under the adapter's layer prefix (either key layout)?"""
    layer = re.escape(adapter.layer_prefix).replace(r"\{L\}", r"\d+")
    routers = "|".join(re.escape(a.router) for a in (adapter, adapter.memory_layout()))
    pattern = re.compile(r"^(?:.*\.)?" + layer + f"(?:{routers})$")
    return any(pattern.match(name) for name in names)


def get_adapter(model_type: str) -> Adapter:
    """The adapter for `model_type`, or a one-line error saying what the derivation could not find."""
    found = find_adapter(model_type)
    if found is not None:
        return found
    close = difflib.get_close_matches(model_type, ADAPTERS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    reason = " ".join(str(REFUSED.get(model_type) or _DERIVED.get(model_type, "")).split())
    raise MoePruneError(
        f"unsupported model_type {model_type!r}{hint}: deriving it from transformers failed: {reason}; "
        f"supported: {', '.join(supported_model_types())} and the MoE families derived from transformers. "
        "Add a row to moe_prune/architectures/table.py to support it."
    )


__all__ = [
    "ADAPTERS",
    "LAYER_RULES",
    "Adapter",
    "Routing",
    "derivation_notes",
    "derived_adapter",
    "find_adapter",
    "fit_layer_prefix",
    "get_adapter",
    "supported_model_types",
    "wrapper_adapter",
]
