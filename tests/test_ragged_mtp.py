"""Ragged checkpoints that keep their multi-token-prediction (MTP) layers, where moe-prune's vLLM plugin sizes them.

prune and merge give an MTP layer the experts of the last decoder MoE layer, whose output it continues. In a
ragged checkpoint that is that layer's count, not the config's one (largest) count, which vLLM's stock MTP class
would build: so a ragged result keeps its MTP MoE layers only for families whose row in checkpoint/serving.py
names the vLLM MTP class the plugin builds at that count (GLM-4-MoE, GLM-4-MoE-Lite, DeepSeek-V3; ERNIE-4.5 and
EXAONE-MoE, whose vLLM MTP layer is dense, are named so that vLLM drafts for their ragged checkpoints); others
still need --drop-mtp (tests/test_mtp.py). Every served family whose MTP layers moe-prune places names one.
The checkpoint reader holds each MTP block to the last layer's count. The plugin's draft override (vLLM's
SpeculativeConfig.hf_config_override, asked under the base name) is checked here over a stand-in;
tests/test_vllm_mtp.py serves such checkpoints with MTP speculative decoding in vLLM.
"""

from __future__ import annotations

import shutil
import types

import pytest
import torch
from helpers import checkpoint_tensors as all_tensors
from safetensors.torch import load_file, save_file
from test_mtp import assert_mirrors_last_layer, experts_of, family_factory, with_mtp  # noqa: F401

from moe_prune.architectures.mtp import MTP_FAMILIES, mtp_layout
from moe_prune.artifacts.mask import DropMask
from moe_prune.checkpoint.serving import SERVED
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.errors import MoePruneError
from moe_prune.runtime.loading import load_model
from moe_prune.serving import vllm_plugin
from moe_prune.stages import prune

FAMILY = "glm4_moe"
LITE = "Glm4MoeLiteMTPModel"


def ragged_with_mtp(family_factory, tmp_path):  # noqa: F811
    """GLM-4-MoE with one MTP layer, pruned so its last MoE layer keeps fewer experts than the first."""
    folder, _, prefix, _ = with_mtp(family_factory, FAMILY, tmp_path)
    ckpt = Checkpoint.open(folder)
    first, last = ckpt.identity.moe_layers[0], ckpt.identity.moe_layers[-1]
    keep = {layer: list(range(8)) for layer in ckpt.identity.moe_layers} | {first: [0, 2, 3, 5, 7], last: [1, 6]}
    out = tmp_path / "ragged"
    prune.run(folder, DropMask.create(ckpt.identity, keep, "test"), out)
    return out, prefix, ckpt.config.adapter.layer_prefix.format(L=last)


def test_ragged_prune_keeps_mtp_at_the_last_layers_count(family_factory, tmp_path):  # noqa: F811
    out, prefix, last = ragged_with_mtp(family_factory, tmp_path)
    tensors = all_tensors(out)
    assert_mirrors_last_layer(tensors, prefix, last)
    assert experts_of(tensors, prefix) == experts_of(tensors, last) == {0, 1}
    opened = Checkpoint.open(out)  # the reader holds the MTP block to the last layer's count, not the largest
    assert sorted(opened.config.experts_per_layer.values()) == [2, 5] and opened.config.num_experts == 5
    with torch.no_grad():  # transformers runs the decoder only: the MTP layer is left aside, as before
        logits = load_model(out, dtype="float32")(torch.arange(3, 30)[None]).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("model_type", ["ernie4_5_moe", "exaone_moe"])
def test_ragged_prune_copies_a_dense_mtp_layer(model_type, family_factory, tmp_path):  # noqa: F811
    """vLLM's MTP class of these families builds a dense layer (a release's MTP layer holds no experts): a ragged
    result keeps it byte for byte, and vLLM drafts with it (tests/test_vllm_mtp.py); one holding experts is refused
    (tests/test_mtp.py)."""
    from test_vllm_mtp import add_mtp_layer

    folder = tmp_path / "mtp"
    shutil.copytree(family_factory(model_type), folder)
    add_mtp_layer(folder, model_type, "dense")
    source = all_tensors(folder)
    ckpt = Checkpoint.open(folder)
    first, last = ckpt.identity.moe_layers[0], ckpt.identity.moe_layers[-1]
    keep = {layer: list(range(8)) for layer in ckpt.identity.moe_layers} | {first: [0, 2, 3, 5, 7], last: [1, 6]}
    prune.run(folder, DropMask.create(ckpt.identity, keep, "test"), tmp_path / "ragged")
    out, config = all_tensors(tmp_path / "ragged"), ckpt.config
    mtp = {name for name in source if mtp_layout(config.adapter, config.text, config.num_layers).looks_mtp(name)}
    assert mtp and mtp <= out.keys() and all(torch.equal(out[name], source[name]) for name in mtp)
    assert Checkpoint.open(tmp_path / "ragged").config.ragged is not None


def test_reader_refuses_an_mtp_block_at_another_layers_count(family_factory, tmp_path):  # noqa: F811
    """A ragged checkpoint whose MTP block holds more experts than the last layer (e.g. the largest count, as a
    stock engine would size it) is refused, naming the MTP layer."""
    out, prefix, _ = ragged_with_mtp(family_factory, tmp_path)
    (shard,) = out.glob("*.safetensors")
    tensors = load_file(shard)
    router = f"{prefix}mlp.gate.weight"
    tensors[router] = torch.cat([tensors[router], tensors[router][:1]])
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(MoePruneError, match=rf"multi-token-prediction layer {prefix}.*\[3, "):
        Checkpoint.open(out)


# vLLM 0.32's SpeculativeConfig.hf_config_override: GLM by architecture, the others by model_type
STOCK_BY_ARCHITECTURE = {"Glm4MoeForCausalLM": "Glm4MoeMTPModel", "Glm4MoeLiteForCausalLM": "Glm4MoeLiteMTPModel"}
STOCK_BY_MODEL_TYPE = {
    "deepseek_v3": "DeepSeekMTPModel",
    "qwen3_next": "Qwen3NextMTP",
    "ernie4_5_moe": "ErnieMTPModel",
    "exaone_moe": "ExaoneMoeMTP",
}


def stock_override(config):
    """vLLM's override as it treats the families above."""
    stock = STOCK_BY_ARCHITECTURE.get(config.architectures[0]) or STOCK_BY_MODEL_TYPE.get(config.model_type)
    if stock:
        config.architectures = [stock]
    return config


def test_every_served_family_with_mtp_layers_drafts_when_ragged():
    """A served family whose MTP layers moe-prune keeps in a ragged checkpoint names vLLM's MTP class for them,
    so the plugin drafts with them rather than refusing (transformers' class of each MTP layout's model type)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL_LM

    placed = {CAUSAL_LM.get(t) for t, family in MTP_FAMILIES.items() if family.layer_prefix is not None}
    assert {"Glm4MoeForCausalLM", "Ernie4_5_MoeForCausalLM"} <= placed
    assert [base for base in sorted(placed & SERVED.keys()) if not SERVED[base].mtp] == []


@pytest.mark.parametrize(
    "architecture,model_type,want",
    [
        ("MoePruneRaggedGlm4MoeForCausalLM", "glm4_moe", ["MoePruneRaggedGlm4MoeMTPModel", "Glm4MoeMTPModel"]),
        ("RaggedGlm4MoeForCausalLM", "glm4_moe", ["MoePruneRaggedGlm4MoeMTPModel", "Glm4MoeMTPModel"]),
        ("Glm4MoeForCausalLM", "glm4_moe", ["Glm4MoeMTPModel"]),  # not ragged: vLLM's own
        ("MoePruneRaggedMixtralForCausalLM", "mixtral", ["MoePruneRaggedMixtralForCausalLM"]),  # no MTP: unchanged
        ("MoePruneRaggedDeepseekV3ForCausalLM", "deepseek_v3", ["MoePruneRaggedDeepSeekMTPModel", "DeepSeekMTPModel"]),
        ("MoePruneRaggedGlm4MoeLiteForCausalLM", "glm4_moe_lite", [f"MoePruneRagged{LITE}", LITE]),
        ("MoePruneRaggedErnie4_5_MoeForCausalLM", "ernie4_5_moe", ["MoePruneRaggedErnieMTPModel", "ErnieMTPModel"]),
        ("MoePruneRaggedExaoneMoeForCausalLM", "exaone_moe", ["MoePruneRaggedExaoneMoeMTP", "ExaoneMoeMTP"]),
        ("MoePruneRaggedQwen3MoeForCausalLM", "qwen3_next", None),  # an MTP class the plugin does not size
    ],
)
def test_draft_override_names_the_plugins_mtp_class(monkeypatch, architecture, model_type, want):
    assert SERVED["Glm4MoeForCausalLM"].mtp == "Glm4MoeMTPModel" and not SERVED["Qwen3MoeForCausalLM"].mtp
    monkeypatch.setattr(vllm_plugin, "_STOCK_OVERRIDE", stock_override)
    config = types.SimpleNamespace(architectures=[architecture], model_type=model_type)
    if want is None:
        with pytest.raises(ValueError, match="does not build Qwen3NextMTP at a ragged checkpoint's"):
            vllm_plugin.draft_override(config)
    else:
        assert vllm_plugin.draft_override(config).architectures == want
