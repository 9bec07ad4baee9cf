"""config.json as transformers reads it, and sizes no model can have: checked before any stage works.

`check_transformers_reads` builds transformers' own config class from the file, as every load does;
`check_sizes` bounds every size-like field by name. Both refuse in one line naming the file
(the other values a model is built or run with are checked in `config_values`).
"""

from __future__ import annotations

import copy
import re
from typing import Any

from moe_prune.architectures.config_values import check_rope_types
from moe_prune.artifacts.common import is_int
from moe_prune.errors import MoePruneError

# Size-like fields (widths, head counts, context length, vocabulary...) as transformers names them in every
# family; found by name so that fields of families added later are covered too. No real model has a size
# above MAX_SIZE (the longest contexts are ~10M positions, the largest vocabularies ~260k).
SIZE_FIELD = re.compile(r"(?:^|_)(?:size|dim|heads|rank|embeddings|experts|layers|groups?|window)$|^(?:num|n)_")
# Those a model cannot have zero of (transformers divides by them or sizes weights and position tables).
POSITIVE_SIZES = (
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "vocab_size",
    "head_dim",
)
MAX_SIZE = 1 << 26


def check_transformers_reads(raw: dict[str, Any], source: str) -> None:
    """Build transformers' own config class from `raw`, as every load does: a field it refuses (a string for
    a bool, an int epsilon, a list for rope parameters, a dtype torch lacks) is one line naming the file here,
    not a tokenizer or model failure later, nor copied by prune, merge or score into an output stock
    transformers cannot load. Types transformers does not ship (remote code) are judged by their own code."""
    model_type = raw.get("model_type")
    auto_map = raw.get("auto_map")
    if not isinstance(model_type, str) or (isinstance(auto_map, dict) and "AutoConfig" in auto_map):
        return
    from transformers import CONFIG_MAPPING
    from transformers.utils import logging

    if model_type not in CONFIG_MAPPING:
        return
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # its warnings about odd token ids are not ours to print on every command
    try:
        cls = CONFIG_MAPPING[model_type]
        built = cls.from_dict(cls._decode_special_floats(copy.deepcopy(raw)))  # {"__float__": "Infinity"}, as saved
    except Exception as exc:  # whatever the config class raises on a field it cannot take
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = lines[-1] if len(lines) > 1 else f"{type(exc).__name__}: {lines[0] if lines else ''}"
        raise MoePruneError(f"{source}: transformers cannot read it ({reason[:300]})") from exc
    finally:
        logging.set_verbosity(verbosity)
    check_rope_types(built, source)


def check_sizes(fields: dict[str, Any], source: str, prefix: str = "") -> None:
    """Refuse a size-like field no model can have (0 heads, 1e9 intermediate size, max_position_embeddings 0).

    Every number under a size-like name (see SIZE_FIELD, nested objects included) must lie in 0..MAX_SIZE;
    POSITIVE_SIZES must be whole numbers from 1. Absent or null fields are transformers' defaults: not checked.
    """
    for key, value in fields.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            check_sizes(value, source, f"{name}.")
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if key in POSITIVE_SIZES and value is not None and not (is_int(value) and 1 <= value <= MAX_SIZE):
            raise MoePruneError(f"{source}: {name} is {value!r}; expected a whole number from 1 to {MAX_SIZE}")
        if number and SIZE_FIELD.search(key) and not 0 <= value <= MAX_SIZE:  # NaN fails too
            raise MoePruneError(f"{source}: {name} is {value!r}; expected a size from 0 to {MAX_SIZE}")
