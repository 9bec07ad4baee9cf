"""transformers' classes of a model type and the tiny models the derivation builds from them.

Shared by every step of the derivation (`derive.py`): the config and CausalLM classes transformers
registers, a model built from a config (meta device: no memory), a config with one value changed.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch

from moe_prune.errors import MoePruneError


class DerivationError(MoePruneError):
    """The derivation could not find something it needs; the message says what."""


@functools.cache
def moe_causal_lm_types() -> tuple[str, ...]:
    """The MoE causal LMs of the installed transformers: MODEL_FOR_CAUSAL_LM_MAPPING_NAMES types whose modeling
    file defines an experts or MoE-block class (transformers' own list, filtered; not a hand-kept one)."""
    from pathlib import Path

    import transformers
    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    root = Path(transformers.__file__).parent / "models"
    pattern = re.compile(r"^class \w+(Experts|MoE|Moe|SparseMoeBlock)\w*\(", re.MULTILINE)
    found = []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        module = model_type_to_module_name(model_type)
        source = root / module / f"modeling_{module}.py"
        if source.exists() and pattern.search(source.read_text()):
            found.append(model_type)
    return tuple(found)


def config_class(model_type: str) -> type:
    """The config class transformers registers for `model_type` (registered ones included)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[model_type]
    except KeyError as exc:
        raise DerivationError(f"transformers knows no model_type {model_type!r}") from exc


@functools.cache
def text_model_type(model_type: str) -> str:
    """The model_type that holds the MoE text model: a wrapper's text config type, else itself."""
    cfg = config_class(model_type)()
    sub = getattr(cfg, "text_config", None)
    return sub.model_type if sub is not None and hasattr(sub, "model_type") else model_type


def causal_lm_class(config) -> type:
    """The CausalLM class AutoModelForCausalLM builds for this config."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError as exc:
        raise DerivationError(f"no causal-LM class for {config.model_type!r}") from exc


def build(config, device: str = "meta") -> torch.nn.Module:
    """The CausalLM of `config` on `device` (meta: no memory, no init)."""
    cls = causal_lm_class(config)
    with torch.device(device):
        model = cls._from_config(config) if device != "meta" else cls(config)
    return model.eval()


def with_value(config, dotted: str, value: Any):
    d = config.to_dict()
    target = d
    *parents, last = dotted.split(".")
    for part in parents:
        target = target[part]
    target[last] = value
    return type(config).from_dict(d)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else ""
