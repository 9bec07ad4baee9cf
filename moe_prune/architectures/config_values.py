"""Values in config.json that the model's code uses as given: special token ids, epsilons, RoPE bases.

`check_sizes` bounds the sizes; these are the other numbers a model is built or run with, where a wrong one
does not fail at load but later or silently: a pad token id past the vocabulary is an assertion inside
torch's Embedding ("could not load the model", naming no field), a negative `rms_norm_eps` or `rope_theta`
makes every logit NaN (profile then records statistics of NaN), `head_dim` 0 builds empty attention, a
RoPE scaling `factor` of 0 or below divides positions by it, a dropout of 2 is torch's RuntimeError in
finetune only. transformers itself only warns about these. Each is one line naming the field.

`check_named_choices` covers the names transformers looks up at load (KeyError or ValueError naming no file)
or that vLLM reads: the weights' `dtype`, the attention implementation, `architectures`; `check_rope_types`
the RoPE types, as transformers' config class reads them.
"""

from __future__ import annotations

import math
import re
from typing import Any

from moe_prune.errors import MoePruneError

# The special token ids loaders and generate() use (transformers' own warning names the same rule).
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
# Numbers that must be finite and above zero wherever they appear (nested rope parameters included).
POSITIVE_NUMBERS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "rope_theta", "factor")
# Probabilities: torch's dropout refuses anything outside [0, 1] when a model trains (finetune), not at load.
PROBABILITY = re.compile(r"dropout(?:_rate|_prob|_p)?$")
# Fields naming the attention implementation transformers loads (config.json may set it for every load).
ATTENTION_FIELDS = ("attn_implementation", "_attn_implementation", "_attn_implementation_internal")
DTYPE_FIELDS = ("dtype", "torch_dtype")


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


def check_probabilities(fields: dict[str, Any], source: str, prefix: str = "") -> None:
    """Dropout rates, nested objects included, are numbers from 0 to 1 (null: the default; true/false: a switch)."""
    for key, value in fields.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            check_probabilities(value, source, f"{name}.")
        elif PROBABILITY.search(key) and _not_a_probability(value):
            raise MoePruneError(f"{source}: {name} is {value!r}; expected a probability from 0 to 1")


def _not_a_probability(value: Any) -> bool:
    """Neither null (the default), true/false (a switch: esm's `token_dropout`) nor a number from 0 to 1."""
    if value is None or isinstance(value, bool):
        return False
    return not (isinstance(value, int | float) and 0 <= value <= 1)


def check_named_choices(fields: dict[str, Any], source: str, prefix: str = "") -> None:
    """The weights' dtype, attention implementation and `architectures` name things that exist.

    Each is what transformers (or vLLM) looks up when it loads the checkpoint, so a wrong one fails there,
    naming no field, or in every loader of an output prune or merge copied it into. An attention
    implementation may also name a Hugging Face Hub kernel (`org/repo`): code, refused like a checkpoint's
    own (`runtime.skeleton.code_decision`), not here.
    """
    for key in DTYPE_FIELDS:
        if fields.get(key) is not None:
            _check_dtype(fields[key], source, f"{prefix}{key}")
    for key in ATTENTION_FIELDS:
        value = fields.get(key)
        if value is not None and not (isinstance(value, str) and (value in attention_names() or hub_kernel(value))):
            raise MoePruneError(
                f"{source}: {prefix}{key} is {value!r}; expected one of {', '.join(sorted(attention_names()))}"
            )
    value = fields.get("architectures")
    if value is not None and not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
        raise MoePruneError(f"{source}: {prefix}architectures is {value!r}; expected a list of class names")


def hub_kernel(value: str) -> bool:
    """An attention implementation that names a Hub repository of kernels (`org/repo`, `org/repo:fn`)."""
    return "/" in value


def attention_names() -> set[str]:
    """The attention implementations transformers ships (`paged|` variants included)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    names = {"eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()}
    return names | {f"paged|{name}" for name in names if not name.startswith("paged|")}


def _check_dtype(value: Any, source: str, name: str) -> None:
    """A floating-point torch dtype name, as transformers' `dtype="auto"` loads the weights in."""
    import torch

    found = getattr(torch, value, None) if isinstance(value, str) else None
    if not (isinstance(found, torch.dtype) and found.is_floating_point):
        raise MoePruneError(f"{source}: {name} is {value!r}; expected a floating-point dtype such as 'bfloat16'")


def check_rope_types(config: Any, source: str) -> None:
    """Each RoPE type of transformers' config object `config` (and of its text config), read after the config
    class has renamed legacy types (Qwen2-VL's `mrope`, Phi-3's `su`), is one transformers can compute: an
    unknown one is a KeyError when the model is built, naming no file."""
    try:
        text = config.get_text_config()
    except ValueError:  # several text configs (an encoder-decoder): the top level only
        text = config
    for found in {id(c): c for c in (config, text)}.values():
        params = getattr(found, "rope_parameters", None)
        if isinstance(params, dict):
            _check_rope_types(params, source, "rope_parameters")


def _check_rope_types(block: dict[str, Any], source: str, name: str) -> None:
    """Each RoPE type (`rope_type`, or legacy `type`), per layer type too, is one transformers knows."""
    from transformers import PretrainedConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    nested = [(f"{name}.{key}", value) for key, value in block.items() if isinstance(value, dict)]
    for where, params in [(name, block), *nested]:
        kind = params.get("rope_type", params.get("type"))
        if kind is None or (isinstance(kind, str) and kind in ROPE_INIT_FUNCTIONS) or kind == "default":
            continue
        if isinstance(kind, str) and hasattr(PretrainedConfig, f"_validate_{kind}_rope_parameters"):
            continue  # a type a family's own code computes (transformers validates it)
        known = ", ".join(["default", *sorted(ROPE_INIT_FUNCTIONS)])
        raise MoePruneError(f"{source}: {where}.rope_type is {kind!r}; expected one of {known}")
