"""Multimodal wrappers (a `text_config`, weights under `model.language_model.*`) pruned to different expert
counts per layer: the checkpoint stock transformers loads with trust_remote_code goes through a second round
(profile whole and --sequential, eval, finetune, a uniform prune back to a stock wrapper) like a plain one.

The ragged prune itself is checked against the masked original for every wrapper in tests/test_derived.py.
"""

from __future__ import annotations

import json
import re

import pytest
import test_derived
import test_eval
import test_profile
import test_ragged
import torch
from tiny_models import save_char_tokenizer

from moe_prune.architectures.config import RAGGED_KEY
from moe_prune.architectures.table import NO_SEQUENTIAL
from moe_prune.artifacts.mask import DropMask
from moe_prune.checkpoint import ragged
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.demo import DEMO_CALIBRATION
from moe_prune.specs.eval import EvalSpec
from moe_prune.stages import evaluate, finetune, profile, prune
from moe_prune.training.options import FinetuneOptions

WRAPPERS = test_derived.wrappers()
# Tensors of a wrapper's other towers (transformers' names for them): never trained by moe-prune.
OUTSIDE_TEXT = re.compile(r"vision|visual|audio|multi_modal|projector")
family_factory = test_derived.family_factory  # the session fixture, built once for both modules


def _ragged(model_type: str, family_factory, tmp_path):
    """(original folder, original model, its checkpoint, the ragged output, kept original ids per layer)."""
    folder, original = family_factory(model_type)
    ckpt = Checkpoint.open(folder)
    mask, keep = test_ragged.ragged_mask(ckpt)
    once = tmp_path / "once"
    prune.run(folder, mask, once)
    save_char_tokenizer(once)
    return folder, original, ckpt, once, keep


def test_every_wrapper_is_tested():
    assert {"gemma4", "llama4", "qwen3_5_moe"} <= set(WRAPPERS), WRAPPERS


@pytest.mark.parametrize("model_type", WRAPPERS)
def test_ragged_wrapper_profiles_evaluates_and_prunes_back(model_type, family_factory, tmp_path):
    folder, original, ckpt, once, keep = _ragged(model_type, family_factory, tmp_path)
    data = tmp_path / "cal.jsonl"
    test_profile.write_docs(data, 4, seed=11)
    result = profile.run(once, str(data), test_profile.settings())
    hard = result.stats.arrays["hard_counts"]
    top_k = ckpt.config.top_k
    for row, layer in zip(hard, ckpt.config.moe_layers, strict=True):
        n = len(keep[layer])
        assert row[n:].sum() == 0, "padding slots past a layer's experts are never picked"
        assert row[:n].sum() == result.tokens * min(top_k, n)
    if test_derived._text_type(model_type) not in NO_SEQUENTIAL:
        layered = profile.run(once, str(data), test_profile.settings(sequential=True)).stats.arrays
        test_profile.assert_same_stats(layered, result.stats.arrays, rtol=1e-9)

    docs = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    scored = evaluate.run(str(once), EvalSpec(data=str(data), seq_len=test_eval.SEQ, batch_size=3)).model
    nll, count = test_eval.independent_nll(once, docs, trust_remote_code=True)
    assert scored.tokens_scored == count and scored.nll == pytest.approx(nll, rel=1e-5)

    smallest = min(len(kept) for kept in keep.values())
    uniform = {layer: kept[:smallest] for layer, kept in keep.items()}
    back = tmp_path / "back"
    prune.run(once, DropMask.create(Checkpoint.open(once).identity, uniform, "test"), back)
    config = json.loads((back / "config.json").read_text())
    wanted = json.loads((folder / "config.json").read_text())["architectures"]
    assert config["architectures"] == wanted, "the wrapper's own class, as transformers saved it"
    assert "auto_map" not in config and not (back / ragged.MODEL_FILE).exists()
    assert RAGGED_KEY not in config and RAGGED_KEY not in config.get("text_config", {})
    test_ragged.assert_matches(back, original, ckpt, uniform, trust_remote_code=False)


def _tensors(folder) -> dict[str, bytes]:
    """Every tensor of a checkpoint folder by name, as raw bytes (dtype and shape included)."""
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        for name, tensor in load_file(shard).items():
            out[name] = (
                str(tensor.dtype),
                tuple(tensor.shape),
                tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes(),
            )
    return out


def _finetune(folder, out):
    options = FinetuneOptions(tokens=2 * 4 * 32, seq_len=32, batch_size=4, lr=1e-3, eval_tokens=0)
    assert finetune.run(folder, str(DEMO_CALIBRATION), out, options).steps == 2


@pytest.mark.parametrize("model_type", WRAPPERS)
def test_finetuned_wrapper_keeps_its_layout_and_vision_tower(model_type, family_factory, tmp_path):
    """The causal LM moe-prune trains holds the text model only; the output is still the whole wrapper: the source's
    tensor names, every tensor outside the trained model byte for byte, the trained ones changed."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    folder, original = family_factory(model_type)
    _finetune(folder, tmp_path / "ft")
    before, after = _tensors(folder), _tensors(tmp_path / "ft")
    assert sorted(after) == sorted(before), "the source's names: the wrapper's layout"
    assert all(before[n][:2] == after[n][:2] for n in before), "same dtypes and shapes"
    outside = {name for name in before if OUTSIDE_TEXT.search(name)}
    assert all(before[n] == after[n] for n in outside), "the vision (and audio) towers are copied unchanged"
    changed = {name for name in before if before[name] != after[name]}
    assert changed and changed <= set(before) - outside
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["model_type"] == model_type
    _, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "ft", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], "loads whole as the multimodal model"
    ids = test_ragged.token_ids()
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "ft").eval()(ids).logits
        assert (got - original(ids).logits).abs().max() > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("model_type", WRAPPERS)
def test_ragged_wrapper_finetunes(model_type, family_factory, tmp_path):
    """Two optimizer steps; the result keeps each layer's count and reloads in stock transformers (its own code)."""
    from transformers import AutoModelForCausalLM

    _, original, _, once, keep = _ragged(model_type, family_factory, tmp_path)
    _finetune(once, tmp_path / "ft")
    tuned = Checkpoint.open(tmp_path / "ft")
    assert tuned.config.experts_per_layer == {layer: len(kept) for layer, kept in keep.items()}
    assert sorted(_tensors(tmp_path / "ft")) == sorted(_tensors(once))
    ids = test_ragged.token_ids()
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "ft", trust_remote_code=True).eval()(ids).logits
        before = original(ids).logits
    assert torch.isfinite(got).all() and (got - before).abs().max() > 1e-4
