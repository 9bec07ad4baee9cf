"""generation_config.json, checked when a checkpoint is opened: prune and merge copy it, and transformers,
lm-eval and vLLM read it when they load the output.

Read with the one bounded JSON reader; the fields those loaders use must have the types they assume
(special token ids within the vocabulary, lengths and counts whole numbers, sampling knobs finite
numbers, do_sample a bool), and transformers' own `GenerationConfig` must accept the rest. Anything else is
one line naming generation_config.json and the field, not an unexpected error at load or at generate.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from moe_prune.architectures.config_values import check_token_ids
from moe_prune.artifacts.common import is_int, json_type, read_json
from moe_prune.errors import MoePruneError

NAME = "generation_config.json"
# Whole numbers from 1 (lengths and counts a loader sizes or loops by) and from 0 (lower bounds, disabled at 0).
POSITIVE_INTS = ("max_length", "max_new_tokens", "num_beams", "num_beam_groups", "num_return_sequences")
NON_NEGATIVE_INTS = ("min_length", "min_new_tokens", "top_k", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size")
# Finite numbers from 0; top_p and the other probabilities at most 1.
NUMBERS = ("temperature", "repetition_penalty", "length_penalty", "diversity_penalty", "encoder_repetition_penalty")
PROBABILITIES = ("top_p", "typical_p", "min_p", "epsilon_cutoff", "eta_cutoff")
BOOLS = ("do_sample", "early_stopping", "use_cache", "output_scores", "return_dict_in_generate")
MAX_COUNT = 1 << 26  # no generation length of a real model is near this (the longest contexts are ~10M)


def check_generation_config(folder: Path, vocab_size: Any) -> None:
    """Refuse a generation_config.json whose loaders would fail or misbehave; absent is fine."""
    path = folder / NAME
    if not path.exists() and not path.is_symlink():
        return
    raw, name = read_json(path, "generation config")
    check_token_ids(raw, name, vocab_size)  # the rule config.json's own ids follow
    for fields, low in ((POSITIVE_INTS, 1), (NON_NEGATIVE_INTS, 0)):
        for field in fields:
            value = raw.get(field)
            if value is not None and not (is_int(value) and low <= value <= MAX_COUNT):
                _refuse(name, field, value, f"a whole number from {low} to {MAX_COUNT}")
    for fields, high in ((NUMBERS, math.inf), (PROBABILITIES, 1.0)):
        for field in fields:
            value = raw.get(field)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if value is not None and not (number and 0 <= value <= high and math.isfinite(value)):
                _refuse(name, field, value, "a finite number from 0" + (" to 1" if high == 1.0 else ""))
    for field in BOOLS:
        value = raw.get(field)
        if value is not None and not isinstance(value, bool) and not (field == "early_stopping" and value == "never"):
            _refuse(name, field, value, "true or false")
    _check_transformers_reads(raw, name)


def _refuse(name: str, field: str, value: Any, expected: str) -> None:
    shown = repr(value) if isinstance(value, int | float | bool | str) else json_type(value)
    raise MoePruneError(f"{name}: {field} is {shown[:80]}; expected {expected}")


def _check_transformers_reads(raw: dict[str, Any], name: str) -> None:
    """transformers' own GenerationConfig built and validated from `raw`, as every model load does."""
    from transformers import GenerationConfig
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # its notes on odd combinations are not ours to print on every command
    try:
        GenerationConfig.from_dict(dict(raw)).validate()
    except Exception as exc:  # whatever it raises on a field it cannot take
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = lines[0] if lines else type(exc).__name__
        raise MoePruneError(f"{name}: transformers cannot read it ({reason[:300]})") from exc
    finally:
        logging.set_verbosity(verbosity)
