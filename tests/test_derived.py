"""Adapters derived from transformers' own modules (moe_prune/architectures/derive*.py).

1. On the families the table has, derived and hand-written adapters agree where surgery needs them to.
2. A model type nobody told us about (a renamed copy registered with the Auto classes) prunes correctly.
3. Every MoE causal LM of the installed transformers prunes to logits equal to the masked original,
   or is listed in UNSUPPORTED with the reason.
4. Every derived family (no table row) passes the battery the table families pass: ragged prune, merge to
   half, whole and --sequential profile, finetune and eval (the test modules' own checks, imported).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_eval
import test_merge
import test_profile
import test_profile_scale
import test_ragged
import torch
import transformers
from safetensors import safe_open
from test_adapters import _compare, random_keep
from tiny_models import COMMON, DBRX, TINY, build_tiny, save_char_tokenizer

from moe_prune.architectures import ADAPTERS, LAYER_RULES, get_adapter
from moe_prune.architectures.derive import derive
from moe_prune.architectures.derive_models import DerivationError, build, moe_causal_lm_types, text_model_type
from moe_prune.architectures.derive_shrink import shrink_config
from moe_prune.architectures.spec import STANDARD_EXPERT_TENSORS
from moe_prune.architectures.table import NO_SEQUENTIAL, REFUSED
from moe_prune.artifacts.mask import DropMask
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.checkpoint.surgery import KeyMatcher
from moe_prune.demo import DEMO_CALIBRATION
from moe_prune.errors import MoePruneError
from moe_prune.runtime.loading import load_model
from moe_prune.specs.eval import EvalSpec
from moe_prune.specs.merge import MergeSpec
from moe_prune.stages import evaluate, finetune, profile, prune
from moe_prune.training.options import FinetuneOptions

# Shrinker overrides where the generic shrink of a family's defaults does not build (per-type oddities).
DERIVED_TINY: dict[str, dict] = {
    # the defaults have one MoE layer; ragged pruning needs two
    "nemotron_h": {"layers_block_type": ["linear_attention", "moe", "full_attention", "moe"]},
    # qk_head_dim is computed (nope + rope) only when unset; the shrink of its default breaks that tie
    "longcat_flash": {"qk_head_dim": 16},
    # a table row: its Mamba heads must tile mamba_expand * hidden_size (validate_architecture), the shrink's do not
    "granitemoehybrid": {
        "mamba_n_heads": 4,
        "mamba_d_head": 16,
        "mamba_d_state": 8,
        "mamba_chunk_size": 8,
        "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
    },
}

# Model types of the installed transformers that are MoE causal LMs but that moe-prune does not support.
# Types not passing here: the tool's own refusals (with the reason users see), and table rows this test cannot build.
UNSUPPORTED: dict[str, str] = {**REFUSED}


def tiny_overrides(model_type: str) -> dict:
    """tests/tiny_models.py's config for table families, else the derived-family overrides."""
    if model_type == "dbrx":
        return DBRX
    if model_type in TINY:
        return {k: v for k, v in {**COMMON, **TINY[model_type]}.items() if v is not None}
    return DERIVED_TINY.get(model_type, {})


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
    """A shrunk random model saved as transformers saves it: a wrapper through its image-text-to-text class
    (the layout of its hub checkpoints), returned as AutoModelForCausalLM loads it back (what moe-prune runs)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    torch.manual_seed(0)
    config = shrink_config(model_type, overrides)
    wrapper = type(config) in AutoModelForImageTextToText._model_mapping and _text_type(model_type) != model_type
    model = (AutoModelForImageTextToText if wrapper else AutoModelForCausalLM).from_config(config)
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
    # as transformers loads it back: what moe-prune runs, and what some families re-initialise (zaya's balancing biases)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _prune_and_compare(folder: Path, original, tmp_path: Path) -> None:
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
    overrides = {**COMMON, "num_local_experts": 8, "num_experts_per_tok": 2}
    original = _build(name, tmp_path / "model", overrides)
    _prune_and_compare(tmp_path / "model", original, tmp_path)


def test_non_moe_type_is_one_line_error():
    with pytest.raises(MoePruneError) as info:
        get_adapter("llama")
    message = str(info.value)
    assert "'llama'" in message and "\n" not in message and "Experts" in message


def test_jetmoe_lockstep_reason_holds():
    """Why jetmoe's attention experts follow its MLP experts' slots (table.py), measured on transformers' own model:
    every config key that changes the MLP expert count changes the attention expert count with it, and top-k sets
    the attention head count; so a stock-loadable result keeps as many attention experts as MLP experts."""
    base = shrink_config("jetmoe")

    def counts(config) -> tuple[int, int, int]:
        layer = build(config).model.layers[0]
        attention = layer.self_attention
        return layer.mlp.input_linear.weight.shape[0], attention.experts.input_linear.weight.shape[0], attention.top_k

    assert counts(base) == (8, 8, 2)
    moved = {}
    for key, value in base.to_dict().items():
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                got = counts(type(base).from_dict({**base.to_dict(), key: value + 2}))
            except Exception:  # a perturbation the config or the model rejects sizes nothing we can build
                continue
            if got[0] != 8:
                moved[key] = got
    assert moved == {"num_local_experts": (10, 10, 2)}, moved
    derived = {k: v for k, v in base.to_dict().items() if k != "num_attention_heads"}  # __post_init__ computes it
    bigger_k = type(base).from_dict({**derived, "num_experts_per_tok": 3})
    assert bigger_k.num_attention_heads == 3 * bigger_k.num_key_value_heads == 6
    assert "jetmoe" not in REFUSED and any("self_attention.experts" in key for key in get_adapter("jetmoe").lockstep)


# -- 3. every MoE causal LM of the installed transformers -------------------------------------------


def test_every_moe_type_passes_or_is_listed():
    types = moe_causal_lm_types()
    assert len(types) >= 50, types
    for model_type in types:
        target = _text_type(model_type)
        assert target in ADAPTERS or target in types or model_type in UNSUPPORTED, model_type
    assert set(UNSUPPORTED) <= set(types) | {_text_type(t) for t in types}


def wrappers() -> list[str]:
    """Multimodal wrappers (a text_config) whose text model is supported: tested as transformers saves them."""
    types = moe_causal_lm_types()
    return sorted(t for t in types if _text_type(t) != t and _text_type(t) not in UNSUPPORTED and t not in UNSUPPORTED)


def _params():
    for model_type in sorted({_text_type(t) for t in moe_causal_lm_types()}) + wrappers():
        reason = UNSUPPORTED.get(model_type)
        yield pytest.param(model_type, marks=pytest.mark.xfail(reason=reason, strict=True)) if reason else model_type


@pytest.fixture(scope="session")
def family_factory(tmp_path_factory):
    """`family_factory(model_type)` -> (folder, model) of any tested type, with a character tokenizer, built once.

    Table families get tests/tiny_models.py's model (the one the other test modules check), derived ones
    `_build`'s shrunk defaults; it has the signature of conftest's `tiny_factory`, so their checks run on it.
    """
    cache: dict[str, tuple[Path, object]] = {}

    def make(model_type: str) -> tuple[Path, object]:
        if model_type not in cache:
            folder = tmp_path_factory.mktemp(model_type) / "model"
            if model_type in TINY:
                model = build_tiny(model_type, folder)
            else:
                model = _build(model_type, folder, tiny_overrides(model_type))
            save_char_tokenizer(folder)
            cache[model_type] = (folder, model)
        return cache[model_type]

    return make


@pytest.mark.parametrize("model_type", list(_params()))
def test_prune_matches_masked_original(model_type, family_factory, tmp_path):
    get_adapter(_text_type(model_type))  # table row or derived; otherwise the one-line reason
    _prune_and_compare(*family_factory(model_type), tmp_path)


# -- 4. the battery of the table families, on every derived family ------------------------------------


def derived_families() -> list[str]:
    """Tested types without a tiny model in tests/tiny_models.py: derived adapters (and table rows built here),
    and the wrappers."""
    types = {_text_type(t) for t in moe_causal_lm_types()}
    return sorted(t for t in types if t not in TINY and t not in UNSUPPORTED) + wrappers()


DERIVED = derived_families()

# Checks a derived family fails through a bug or limit outside the derivation (strict: a fix shows up here).
# --sequential is refused for these (one line, reason in the table); the strict xfail notices if that changes.
KNOWN_FAILURES: dict[tuple[str, str], str] = {
    **{("sequential", t): reason for t in DERIVED if (reason := NO_SEQUENTIAL.get(_text_type(t)))},
}


def battery(check: str) -> list:
    """DERIVED as parameters, the KNOWN_FAILURES of `check` marked strict xfail with their reason."""
    return [
        pytest.param(t, marks=pytest.mark.xfail(reason=KNOWN_FAILURES[(check, t)], strict=True))
        if (check, t) in KNOWN_FAILURES
        else t
        for t in DERIVED
    ]


@pytest.mark.parametrize("model_type", battery("ragged"))
def test_derived_ragged_prune_matches_masked_original(model_type, family_factory, tmp_path):
    """Different expert counts per layer, reloaded with moe-prune's loader (the shipped model code) and with stock
    transformers running the checkpoint's own copy of it (a wrapper's wrapper config included)."""
    from transformers import AutoModelForCausalLM

    folder, original = family_factory(model_type)
    ckpt = Checkpoint.open(folder)
    mask, keep = test_ragged.ragged_mask(ckpt)
    out = tmp_path / "out"
    result = prune.run(folder, mask, out)
    assert result.ragged and result.experts_after_per_layer == {k: len(v) for k, v in keep.items()}
    test_ragged.check_ragged_files(out, keep)
    ids = test_ragged.token_ids()
    want = test_ragged.reference(original, ckpt, keep, ids)
    with torch.no_grad():
        full = original(ids).logits
        for model in (load_model(out), AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()):
            got = model(ids).logits
            assert torch.allclose(got, want, atol=2e-5, rtol=1e-4), (got - want).abs().max()
    assert (got - full).abs().max() > 1e-4, "dropping experts changed nothing: the check would be vacuous"


@pytest.mark.parametrize("model_type", DERIVED)
def test_derived_merge_to_half_reloads_in_stock_transformers(model_type, family_factory, tmp_path):
    test_merge.test_merge_to_half_reloads_in_stock_transformers(model_type, family_factory, tmp_path)


@pytest.mark.parametrize("model_type", battery("merge copies"))
def test_derived_merging_permuted_copies_equals_pruning_to_the_anchors(model_type, family_factory, tmp_path):
    test_merge.test_merging_permuted_copies_equals_pruning_to_the_anchors(model_type, family_factory, tmp_path)


def test_gemma4_merge_refit_is_refused_for_its_per_expert_scale(family_factory, tmp_path):
    """gemma4's router.per_expert_scale multiplies each expert's output; the refit fits the down projection without
    it, so merge --refit is refused in one line and nothing is written."""
    import numpy as np

    from moe_prune.artifacts.stats import Stats
    from moe_prune.stages import merge

    folder, _ = family_factory("gemma4_text")
    ckpt = Checkpoint.open(folder)
    stats = test_merge.synthetic_stats(ckpt)
    layers, experts = stats.arrays["hard_counts"].shape
    inner, hidden = 8, 4
    eye = np.broadcast_to(np.eye(inner), (layers, experts, inner, inner)).copy()
    arrays = {**stats.arrays, "refit_hh": eye, "refit_hy": np.zeros((layers, experts, inner, hidden))}
    with pytest.raises(MoePruneError, match="per-expert scale") as info:
        merge.run(folder, Stats(ckpt.identity, arrays), tmp_path / "out", 4, MergeSpec(refit=True))
    assert "\n" not in str(info.value) and "router.per_expert_scale" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_merge_refit_pass_is_refused_with_the_one_sequential_refusal(family_factory, tmp_path):
    """gemma4's decoder layers take per-layer inputs that layer-by-layer replay cannot give: merge --refit without
    refit sums (its layer-by-layer pass) is refused with `--sequential`'s one line (`check_layerwise`: the config,
    the family's reason from the table), naming the pass and what to do; nothing is written."""
    from moe_prune.runtime.sequential import open_layerwise
    from moe_prune.stages import merge

    folder, _ = family_factory("gemma4_text")
    ckpt = Checkpoint.open(folder)
    family = ckpt.config.model_type
    with pytest.raises(MoePruneError) as refused:
        merge.run(folder, test_merge.synthetic_stats(ckpt), tmp_path / "out", 4, MergeSpec(refit=True))
    shared = f" is not supported for {family} ({NO_SEQUENTIAL[family]}); "
    assert str(refused.value) == (
        f"{folder / 'config.json'}: merge --refit's layer-by-layer pass (no refit sums in the statistics)"
        f"{shared}profile with --refit-stats (the sums make the pass unneeded)"
    )
    assert not (tmp_path / "out").exists()
    with pytest.raises(MoePruneError) as sequential:  # profile/eval --sequential: the same line, its own option
        open_layerwise(ckpt, "float32", "cpu", False, "profile the whole model")
    assert str(sequential.value) == f"{folder / 'config.json'}: --sequential{shared}profile the whole model"


@pytest.mark.parametrize("model_type", DERIVED)
def test_derived_profile_counts_top_k_per_token(model_type, family_factory, tmp_path):
    """Whole-model profile: every token of every window picks top-k experts in every MoE layer."""
    folder, _ = family_factory(model_type)
    data = tmp_path / "cal.jsonl"
    test_profile.write_docs(data, 4, seed=11)
    result = profile.run(folder, str(data), test_profile.settings())
    config = Checkpoint.open(folder).config
    hard = result.stats.arrays["hard_counts"]
    assert hard.shape == (len(config.moe_layers), config.num_experts)
    if config.adapter.tail_experts:  # picks of longcat's zero experts are no expert's (tests/test_zero_experts.py)
        assert (hard.sum(axis=1) <= result.tokens * config.top_k).all()
    else:
        assert (hard.sum(axis=1) == result.tokens * config.top_k).all()


@pytest.mark.parametrize("model_type", battery("sequential"))
def test_derived_sequential_profile_equals_whole_model(model_type, family_factory, tmp_path):
    test_profile_scale.test_sequential_equals_whole_model(model_type, True, lambda t: family_factory(t)[0], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", DERIVED)
def test_derived_finetune_a_few_steps(model_type, family_factory, tmp_path):
    """Two optimizer steps on every parameter; the result reloads in stock transformers and changed."""
    folder, original = family_factory(model_type)
    options = FinetuneOptions(tokens=2 * 4 * 32, seq_len=32, batch_size=4, lr=1e-3, eval_tokens=0)
    result = finetune.run(folder, str(DEMO_CALIBRATION), tmp_path / "ft", options)
    assert result.steps == 2
    ids = test_ragged.token_ids()
    with torch.no_grad():
        got = test_merge.load_stock(tmp_path / "ft")(ids).logits
        before = original(ids).logits
    assert torch.isfinite(got).all() and (got - before).abs().max() > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("model_type", DERIVED)
def test_derived_eval_matches_the_models_own_loss(model_type, family_factory, tmp_path):
    folder, _ = family_factory(model_type)
    data = tmp_path / "docs.jsonl"
    test_profile.write_docs(data, 6, seed=3)
    docs = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    result = evaluate.run(str(folder), EvalSpec(data=str(data), seq_len=test_eval.SEQ, batch_size=3)).model
    nll, count = test_eval.independent_nll(folder, docs)
    assert result.tokens_scored == count
    assert result.nll == pytest.approx(nll, rel=1e-5)
    config = Checkpoint.open(folder).config
    for load in result.load:  # picks of longcat's zero experts are no expert's
        assert sum(load.counts) == load.tokens * config.top_k or (
            config.adapter.tail_experts and sum(load.counts) < load.tokens * config.top_k
        )
