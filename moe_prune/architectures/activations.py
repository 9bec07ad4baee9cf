"""Activation names in config.json, checked against transformers' own table (`ACT2FN`) when the config is read.

A model's code looks its activation up by name (`ACT2FN[config.hidden_act]`) only when the model is built,
so an unknown name was an unexpected KeyError in the commands that load the model and was copied without
a word by those that do not (prune, merge, score --model). Every field named like an activation
(`hidden_act`, `hidden_activation`, `mlp_hidden_act`, `activation_function`..., nested configs included)
that holds a name must be one of transformers' activations. Types transformers does not ship (remote
code) are judged by their own code, as in `config_checks.check_transformers_reads`.
"""

from __future__ import annotations

import re
from typing import Any

from moe_prune.errors import MoePruneError

# Field names that hold an activation's name in transformers' configs (found by name, so new families count too).
ACTIVATION_FIELD = re.compile(r"(?:^|_)(?:act|activation)(?:_fn|_function)?$")
# Of those, the ones a model always looks up: any value but a name (or null: the default) is refused.
LOOKED_UP = ("hidden_act", "hidden_activation", "mlp_hidden_act", "activation_function")


def check_activations(raw: dict[str, Any], source: str) -> None:
    """Refuse an activation name transformers does not know (one line naming the file and the field)."""
    from transformers import CONFIG_MAPPING
    from transformers.activations import ACT2FN

    model_type = raw.get("model_type")
    auto_map = raw.get("auto_map")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        return
    if isinstance(auto_map, dict) and "AutoConfig" in auto_map:
        return
    known = sorted(ACT2FN)
    for name, value in _activation_fields(raw, ""):
        if isinstance(value, str) and value in ACT2FN:
            continue
        if isinstance(value, str) or (value is not None and name.rsplit(".", 1)[-1] in LOOKED_UP):
            raise MoePruneError(
                f"{source}: {name} is {str(value)[:60]!r}, not an activation transformers knows "
                f"(one of {', '.join(known)})"
            )


def _activation_fields(fields: dict[str, Any], prefix: str) -> list[tuple[str, Any]]:
    """(dotted name, value) of every activation-like field, nested objects included."""
    found = []
    for key, value in fields.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found.extend(_activation_fields(value, f"{name}."))
        elif isinstance(key, str) and ACTIVATION_FIELD.search(key):
            found.append((name, value))
    return found
