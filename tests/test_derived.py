"""Adapters derived from transformers' own modules (moe_prune/architectures/derive.py).

1. On the families the table has, derived and hand-written adapters agree where surgery needs them to.
2. A model type nobody told us about (a renamed copy registered with the Auto classes) prunes correctly.
3. Every MoE causal LM of the installed transformers prunes to logits equal to the masked original,
   or is listed in UNSUPPORTED with the reason.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from test_adapters import _compare, random_keep
from tiny_models import COMMON, DBRX, TINY, build_tiny

from moe_prune.architectures import ADAPTERS, LAYER_RULES, get_adapter
from moe_prune.architectures.derive import DerivationError, derive, shrink_config, text_model_type
from moe_prune.architectures.spec import STANDARD_EXPERT_TENSORS
from moe_prune.architectures.table import REFUSED
from moe_prune.artifacts.mask import DropMask
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.checkpoint.surgery import KeyMatcher
from moe_prune.errors import MoePruneError
from moe_prune.stages import prune

# Shrinker overrides where the generic shrink of a family's defaults does not build (per-type oddities).
DERIVED_TINY: dict[str, dict] = {}

# Model types of the installed transformers that are MoE causal LMs but that moe-prune does not support.
# Types not passing here: the tool's own refusals (with the reason users see), and table rows this test cannot build.
UNSUPPORTED: dict[str, str] = {
    **REFUSED,
    "granitemoehybrid": "table row; the generic shrinker fails its Mamba validation, so this test cannot build it",
}


def tiny_overrides(model_type: str) -> dict:
    """tests/tiny_models.py's config for table families, else the derived-family overrides."""
    if model_type == "dbrx":
        return DBRX
    if model_type in TINY:
        return {k: v for k, v in {**COMMON, **TINY[model_type]}.items() if v is not None}
    return DERIVED_TINY.get(model_type, {})


@functools.cache
def moe_causal_lms() -> tuple[str, ...]:
    """MODEL_FOR_CAUSAL_LM_MAPPING_NAMES types whose modeling file defines an `*Experts` module."""
    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    root = Path(transformers.__file__).parent / "models"
    found = []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        module = model_type_to_module_name(model_type)
        source = root / module / f"modeling_{module}.py"
        if source.exists() and re.search(r"^class \w+Experts\(", source.read_text(), re.MULTILINE):
            found.append(model_type)
    return tuple(found)


def _text_type(model_type: str) -> str:
    """Wrappers (multimodal, with a text_config) are tested through their text model type."""
    try:
        return text_model_type(model_type)
    except DerivationError:
        return model_type


# -- 1. agreement with the table --------------------------------------------------------------------

# Where derived and hand-written rows legitimately differ (field -> model types), and why:
# - routing.select_on "logits" (top-k on logits, then softmax/sigmoid of the chosen) selects and weighs
#   exactly like "scores" for softmax and sigmoid (both monotonic); the derivation reads the behaviour,
#   not the code, so it says "scores".
# - phimoe's sparsemixer matches no candidate rule; the table's softmax is what statistics use there too.
ROUTING_SAME_MATH = {"granitemoe", "granitemoeshared", "granitemoehybrid", "gpt_oss", "llama4_text"}
ROUTING_UNREAD = {"phimoe"}
# Table rows the derivation cannot reproduce at all (the table is where such oddities live).
TABLE_ONLY = {"dbrx": "experts are 2-D [E*I, H] blocks, not fused 3-D tensors with a leading expert axis"}


def _derived_for_table(model_type: str):
    try:
        return derive(model_type, tiny_overrides(model_type)).adapter
    except DerivationError as exc:
        pytest.fail(f"{model_type}: {exc}")


def _keys_of(folder: Path) -> list[str]:
    ckpt = Checkpoint.open(folder)
    keys = []
    for shard in ckpt.shard_files:
        with safe_open(shard, "pt") as handle:
            keys += list(handle.keys())
    return keys


def _classified(adapter, keys: list[str]) -> dict[str, tuple]:
    matcher = KeyMatcher(adapter)
    out = {}
    for key in keys:
        got = matcher.classify(key)
        out[key] = None if got is None else (got.kind, got.layer, got.slot)
    return out


@pytest.mark.parametrize("model_type", sorted(set(TINY) & set(ADAPTERS)))
def test_derived_agrees_with_table(model_type, tiny_factory, tmp_path):
    table = ADAPTERS[model_type]
    if model_type in TABLE_ONLY:
        with pytest.raises(DerivationError):
            derive(model_type, tiny_overrides(model_type))
        return
    derived = _derived_for_table(model_type)
    folder, original = tiny_factory(model_type)
    raw = json.loads((folder / "config.json").read_text())
    present = {k for k in raw} | {f"{k}.{s}" for k, v in raw.items() if isinstance(v, dict) for s in v}
    assert set(derived.expert_count_keys) & present == set(table.expert_count_keys) & present
    assert set(derived.top_k_keys) & present == set(table.top_k_keys) & present
    n_layers = raw[table.layer_count_key]
    assert LAYER_RULES["derived"](raw, n_layers) == LAYER_RULES[table.moe_layers](raw, n_layers)
    fused = tmp_path / "fused"
    original.save_pretrained(fused, save_original_format=False)
    for keys in (_keys_of(folder), _keys_of(fused)):
        assert _classified(derived, keys) == _classified(table, keys)
    for field in ("runtime_layers", "runtime_router", "runtime_experts", "router_logits_output", "selection_from"):
        assert getattr(derived, field) == getattr(table, field), field
    assert (derived.selection_bias is None) == (table.selection_bias is None)
    assert derived.routing.score == table.routing.score or model_type in ROUTING_UNREAD
    assert derived.routing.grouped == table.routing.grouped
    if model_type not in ROUTING_SAME_MATH | ROUTING_UNREAD:
        assert derived.routing.select_on == table.routing.select_on
    listed = {t.suffix: t for t in table.expert_tensors}
    for tensor in derived.expert_tensors:  # the first entry per suffix decides (merging/tensors.py)
        assert listed.get(tensor.suffix, tensor) == tensor or tensor in STANDARD_EXPERT_TENSORS, tensor


# -- 2. a family the table has never heard of --------------------------------------------------------


def _register_renamed() -> str:
    """A renamed copy of Mixtral, registered under a new model_type (what a future family looks like)."""
    from transformers import AutoConfig, AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

    name = "moe_prune_renamed_mixtral"
    if name in transformers.models.auto.configuration_auto.CONFIG_MAPPING:
        return name
    config_cls = type("RenamedMixtralConfig", (MixtralConfig,), {"model_type": name})
    model_cls = type("RenamedMixtralForCausalLM", (MixtralForCausalLM,), {"config_class": config_cls})
    AutoConfig.register(name, config_cls)
    AutoModelForCausalLM.register(config_cls, model_cls)
    return name


def _build(model_type: str, folder: Path, overrides: dict):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(shrink_config(model_type, overrides))
    with torch.no_grad():  # default init is tiny; make experts and routers matter so tests can fail
        for name, param in list(model.named_parameters()) + list(model.named_buffers()):
            if not param.is_floating_point():
                continue
            if any(part in name for part in ("experts", "router", "gate", "input_linear", "output_linear")):
                param.normal_(0.0, 0.3)
            elif "correction_bias" in name or name.endswith("expert_bias"):
                param.normal_(0.0, 0.5)
    model.eval()
    model.save_pretrained(folder)
    return model


def _prune_and_compare(model_type: str, tmp_path: Path, overrides: dict) -> None:
    folder = tmp_path / "model"
    # Table families: the same tiny model tests/test_adapters.py checks.
    original = build_tiny(model_type, folder) if model_type in TINY else _build(model_type, folder, overrides)
    ckpt = Checkpoint.open(folder)
    n = ckpt.config.num_experts
    for n_drop in sorted({ckpt.config.n_group, n // 2}):
        keep = random_keep(ckpt, n_drop, seed=n_drop)
        out = tmp_path / f"drop{n_drop}"
        prune.run(folder, DropMask.create(ckpt.identity, keep, "test"), out)
        assert Checkpoint.open(out).config.num_experts == n - n_drop
        dropped = {layer: sorted(set(range(n)) - set(kept)) for layer, kept in keep.items()}
        _compare(original, out, ckpt, dropped)


def test_unknown_family_prunes_without_code_change(tmp_path):
    name = _register_renamed()
    assert name not in ADAPTERS
    adapter = get_adapter(name)
    assert adapter.model_type == name and adapter.runtime_experts == "mlp.experts"
    _prune_and_compare(name, tmp_path, {**COMMON, "num_local_experts": 8, "num_experts_per_tok": 2})


def test_non_moe_type_is_one_line_error():
    with pytest.raises(MoePruneError) as info:
        get_adapter("llama")
    message = str(info.value)
    assert "'llama'" in message and "\n" not in message and "Experts" in message


# -- 3. every MoE causal LM of the installed transformers -------------------------------------------


def test_every_moe_type_passes_or_is_listed():
    types = moe_causal_lms()
    assert len(types) >= 50, types
    for model_type in types:
        target = _text_type(model_type)
        assert target in ADAPTERS or target in types or model_type in UNSUPPORTED, model_type
    assert set(UNSUPPORTED) <= set(types) | {_text_type(t) for t in types}


def _params():
    for model_type in sorted({_text_type(t) for t in moe_causal_lms()}):
        reason = UNSUPPORTED.get(model_type)
        yield pytest.param(model_type, marks=pytest.mark.xfail(reason=reason, strict=True)) if reason else model_type


@pytest.mark.parametrize("model_type", list(_params()))
def test_prune_matches_masked_original(model_type, tmp_path):
    get_adapter(model_type)  # table row or derived; otherwise the one-line reason
    _prune_and_compare(model_type, tmp_path, tiny_overrides(model_type))
