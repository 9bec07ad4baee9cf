"""Every architecture adapter against what transformers itself writes and loads.

Prune a tiny random model, reload it with stock AutoModelForCausalLM, and compare its logits
with the ORIGINAL model whose dropped experts are masked out of routing (tests/reference.py).
"""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from reference import masked_logits
from safetensors import safe_open
from tiny_models import TINY
from transformers import AutoModelForCausalLM

from moe_prune.architectures import ADAPTERS
from moe_prune.architectures.derive_models import moe_causal_lm_types
from moe_prune.artifacts.mask import DropMask
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.checkpoint.surgery import KeyMatcher
from moe_prune.stages import prune

FAMILIES = sorted(TINY)
REQUIRED = {
    "mixtral", "phimoe", "qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe", "deepseek_v2", "deepseek_v3",
    "glm4_moe", "ernie4_5_moe", "hunyuan_v1_moe", "jamba", "granitemoe", "gpt_oss", "llama4_text", "dbrx",
}  # fmt: skip


def test_required_families_have_adapters_and_tiny_models():
    assert set(ADAPTERS) >= REQUIRED
    # zaya, inkling_text, longcat_flash and jetmoe are table rows (routers or experts the derivation cannot find)
    # built by test_derived's shrinker, granitemoehybrid too (with its Mamba sizes set in DERIVED_TINY)
    by_shrinker = {"zaya", "inkling_text", "longcat_flash", "jetmoe", "granitemoehybrid"}
    assert by_shrinker <= set(moe_causal_lm_types())
    assert set(ADAPTERS) - {"qwen3_5_moe_text"} - by_shrinker <= set(TINY)


def random_keep(ckpt: Checkpoint, n_drop: int, seed: int) -> dict[int, list[int]]:
    """Original ids to keep per layer, dropping `n_drop`, spread evenly over routing groups."""
    rng = random.Random(seed)
    n_group = ckpt.config.n_group
    keep = {}
    for layer in ckpt.identity.moe_layers:
        ids = list(ckpt.identity.original_ids[layer])
        size = len(ids) // n_group
        kept = []
        for g in range(n_group):
            group = ids[g * size : (g + 1) * size]
            rng.shuffle(group)
            kept += group[n_drop // n_group :]
        keep[layer] = sorted(kept)
    return keep


def _compare(original, folder, ckpt, dropped_slots, seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(0, 100, (2, 12))
    pruned = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        got = pruned(ids).logits
        full = original(ids).logits
    want = masked_logits(copy.deepcopy(original), ckpt.config.adapter, ckpt.config.num_experts, dropped_slots, ids)
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-4), (got - want).abs().max()
    assert (got - full).abs().max() > 1e-4, "dropping experts changed nothing: the check would be vacuous"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_config_rule_matches_router_keys_on_disk(model_type, tiny_factory):
    folder, _ = tiny_factory(model_type)
    ckpt = Checkpoint.open(folder)
    matcher = KeyMatcher(ckpt.config.adapter)
    routers = sorted({layer for t in ckpt.tensors if (layer := matcher.is_router(t.name)) is not None})
    assert routers == ckpt.config.moe_layers
    n = ckpt.config.num_experts
    per_expert = {
        matcher.classify(t.name).slot for t in ckpt.tensors if (k := matcher.classify(t.name)) and k.slot is not None
    }
    fused = [
        t
        for t in ckpt.tensors
        if (k := matcher.classify(t.name)) and k.kind == "rows" and matcher.is_router(t.name) is None
    ]
    assert per_expert == set(range(n)) or fused, "adapter found no expert tensors"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_prune_matches_masked_original(model_type, tiny_factory, tmp_path):
    folder, original = tiny_factory(model_type)
    ckpt = Checkpoint.open(folder)
    n = ckpt.config.num_experts
    for n_drop in sorted({ckpt.config.n_group, n // 2}):
        keep = random_keep(ckpt, n_drop, seed=n_drop)
        out = tmp_path / f"drop{n_drop}"
        result = prune.run(folder, DropMask.create(ckpt.identity, keep, "test"), out)
        assert result.experts_after == n - n_drop
        config = json.loads((out / "config.json").read_text())
        assert Checkpoint.open(out).config.num_experts == n - n_drop
        for key in ckpt.config.adapter.expert_count_keys:
            if "." not in key and key in config:
                assert config[key] == n - n_drop
        dropped = {layer: sorted(set(range(n)) - set(kept)) for layer, kept in keep.items()}
        _compare(original, out, ckpt, dropped)


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3", "gpt_oss", "qwen2_moe", "dbrx"])
def test_second_prune_speaks_original_ids(model_type, tiny_factory, tmp_path):
    folder, original = tiny_factory(model_type)
    ckpt = Checkpoint.open(folder)
    n, groups = ckpt.config.num_experts, ckpt.config.n_group
    first_keep = random_keep(ckpt, groups, seed=1)
    once = tmp_path / "once"
    prune.run(folder, DropMask.create(ckpt.identity, first_keep, "test"), once)
    pruned = Checkpoint.open(once)
    assert pruned.identity.original_ids == {k: tuple(v) for k, v in first_keep.items()}
    second_keep = random_keep(pruned, groups, seed=2)
    twice = tmp_path / "twice"
    prune.run(once, DropMask.create(pruned.identity, second_keep, "test"), twice)
    final = Checkpoint.open(twice)
    assert final.identity.original_ids == {k: tuple(v) for k, v in second_keep.items()}
    dropped = {layer: sorted(set(range(n)) - set(kept)) for layer, kept in second_keep.items()}
    _compare(original, twice, ckpt, dropped)


def test_first_mask_does_not_fit_pruned_model(tiny_factory, tmp_path):
    folder, _ = tiny_factory("mixtral")
    ckpt = Checkpoint.open(folder)
    mask = DropMask.create(ckpt.identity, random_keep(ckpt, 2, seed=0), "test")
    prune.run(folder, mask, tmp_path / "once")
    with pytest.raises(Exception, match=r"expects 8 experts in layer 0 but .* has 6"):
        prune.run(tmp_path / "once", mask, tmp_path / "twice")


@pytest.mark.parametrize("model_type", FAMILIES)
def test_fused_layout_on_disk_is_accepted(model_type, tiny_factory, tmp_path):
    _, original = tiny_factory(model_type)
    fused = tmp_path / "fused"
    original.save_pretrained(fused, save_original_format=False)
    ckpt = Checkpoint.open(fused)
    with safe_open(ckpt.shard_files[0], "pt") as handle:
        assert not any(".experts.0." in k for k in handle.keys()), "expected fused expert tensors on disk"
    keep = random_keep(ckpt, 4, seed=3)
    out = tmp_path / "out"
    prune.run(fused, DropMask.create(ckpt.identity, keep, "test"), out)
    n = ckpt.config.num_experts
    _compare(original, out, ckpt, {layer: sorted(set(range(n)) - set(k)) for layer, k in keep.items()})
