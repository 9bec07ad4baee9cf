"""Values in config.json that the model's code uses as given: special token ids, epsilons, RoPE bases.

`check_sizes` bounds the sizes; these are the other numbers a model is built or run with, where a wrong one
does not fail at load but later or silently: a pad token id past the vocabulary is an assertion inside
torch's Embedding ("could not load the model", naming no field), a negative `rms_norm_eps` or `rope_theta`
makes every logit NaN (profile then records statistics of NaN), `head_dim` 0 builds empty attention.
transformers itself only warns about token ids outside the vocabulary. Each is one line naming the field.
"""

from __future__ import annotations

import math
from typing import Any

from moe_prune.errors import MoePruneError

# The special token ids loaders and generate() use (transformers' own warning names the same rule).
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
# Numbers that must be finite and above zero wherever they appear (nested rope parameters included).
POSITIVE_NUMBERS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "rope_theta")


def check_token_ids(fields: dict[str, Any], source: str, vocab: Any, prefix: str = "") -> None:
    """Each special token id present is a token id, or a non-empty list of them, within the vocabulary."""
    size = vocab if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0 else None
    expected = f"a token id from 0 to {size - 1} (vocab_size {size})" if size else "a token id from 0"
    for field in TOKEN_IDS:
        value = fields.get(field)
        if value is None:
            continue
        ids = value if isinstance(value, list) else [value]
        good = bool(ids) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 and (size is None or i < size) for i in ids
        )
        if not good:
            shown = repr(value) if isinstance(value, int | float | str | bool) else f"{type(value).__name__} {value!r}"
            raise MoePruneError(f"{source}: {prefix}{field} is {shown[:80]}; expected {expected}, or a list of them")


def check_positive_numbers(fields: dict[str, Any], source: str, prefix: str = "") -> None:
    """Epsilons and RoPE bases, nested objects included, are finite numbers above zero (null: the default)."""
    for key, value in fields.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            check_positive_numbers(value, source, f"{name}.")
        elif key in POSITIVE_NUMBERS and value is not None:
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value > 0):
                raise MoePruneError(f"{source}: {name} is {value!r}; expected a finite number above 0")
