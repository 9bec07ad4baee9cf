"""Ragged checkpoints that keep their multi-token-prediction layer, served by vLLM (CPU build) through the plugin
with MTP speculative decoding (`speculative_config={"method": "mtp"}`), one family per job of one vLLM process.

Tiny random models with one MTP layer, pruned so the first MoE layer keeps 5 experts and the last 2. Where vLLM's
MTP class builds an MoE MTP layer (GLM-4-MoE, GLM-4-MoE-Lite, DeepSeek-V3), the layer is a copy of the last MoE
layer, whose experts prune gives it: vLLM's stock class would build it at the config's 5 and fail to load; the
plugin's builds it at the last layer's count and top-k. Where vLLM's MTP class builds a dense layer (ERNIE-4.5's
LlamaDecoderLayer, EXAONE-MoE's is_mtp ExaoneMoeGatedMLP), the layer is a copy of the first, dense decoder layer:
nothing to size, but vLLM needs the plugin to name the class for a ragged checkpoint. Checked: prompt log-probs
equal transformers' (the MTP layer takes no part in them); the drafter is the plugin's class, at the last layer's
size, and drafted; greedy decoding with drafting gives transformers' greedy tokens (greedy acceptance changes speed,
never the output). The MLA families (GLM-4-MoE-Lite, DeepSeek-V3) are served with MLA off
(test_vllm_serving.run_script). Marked `vllm`: `pytest -m vllm`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_vllm_serving import TOLERANCE, run_script, transformers_logprobs, vllm_python  # noqa: F401
from vllm_tiny import DEEPSEEK_V3, MLA_HEADS, TINY_RAGGED, Tiny, tiny_model

from moe_prune.architectures.config import RAGGED_KEY
from moe_prune.artifacts.mask import DropMask
from moe_prune.checkpoint.serving import SERVED
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.runtime.loading import load_model
from moe_prune.stages import prune

FIRST, LAST = [0, 2, 3, 5, 7], [6, 1]  # experts kept by the first MoE layer and the last (the layers between cycle)
GENERATE = 8
PLUGIN = "moe_prune.serving.vllm_plugin.Ragged"
# GLM-4-MoE-Lite: MLA heads vLLM CPU takes with MLA off and the hub config.json's first_k_dense_replace, which
# vLLM's class reads and transformers' config lacks
GLM_LITE = {**MLA_HEADS, "first_k_dense_replace": 1}


class MtpCase(NamedTuple):
    """A family served with MTP drafting: its tiny model, the decoder layer its MTP layer copies, the tolerance."""

    tiny: Tiny
    copies: str  # "last": the last MoE layer (vLLM builds an MoE MTP layer); "dense": the first dense layer
    # (relative perplexity, log-prob) differences: where vLLM's own class differs as much on the unpruned model
    tolerance: tuple[float, float] = (TOLERANCE, 1e-3)


CASES = {
    "glm4_moe": MtpCase(TINY_RAGGED["glm4_moe"], "last"),
    # log-probs up to 3.9e-3 off: vLLM's non-MLA attention (its own class is 2.1e-4 off on an unpruned tiny model)
    "glm4_moe_lite": MtpCase(Tiny(GLM_LITE), "last", (TOLERANCE, 1e-2)),
    "ernie4_5_moe": MtpCase(TINY_RAGGED["ernie4_5_moe"], "dense"),
    "exaone_moe": MtpCase(TINY_RAGGED["exaone_moe"], "dense"),
    # 8.0e-5 off, log-probs up to 2.4e-3: vLLM's non-MLA attention (its own class: 5.4e-5 and 2.9e-3 unpruned)
    "deepseek_v3": MtpCase(Tiny(DEEPSEEK_V3), "last", (TOLERANCE, 1e-2)),
}


def add_mtp_layer(folder: Path, model_type: str, copies: str) -> None:
    """`folder` (edited in place) with one MTP layer in the family's layout (tests/test_mtp.py), a copy of a decoder
    layer, and its extras (norms ones, projections random); the config counts it."""
    from test_mtp import layout_of

    config = Checkpoint.open(folder).config
    source = config.moe_layers[-1] if copies == "last" else min(set(range(config.num_layers)) - set(config.moe_layers))
    key, prefix, extras = layout_of(model_type, folder)
    tensors = load_file(folder / "model.safetensors")
    layer = config.adapter.layer_prefix.format(L=source)
    for name in [n for n in tensors if n.startswith(layer)]:
        tensors[prefix + name[len(layer) :]] = tensors[name].clone()
    hidden = int(config.text["hidden_size"])
    generator = torch.Generator().manual_seed(7)
    for name in extras:  # test_mtp's names; shapes at this model's hidden size
        if name.endswith(("embed_tokens.weight", "head.weight")):
            tensors[name] = tensors["model.embed_tokens.weight"].clone()
        elif "proj" in name or ".fc." in name:  # eh_proj, mtp_linear_proj.0, mtp.fc
            tensors[name] = torch.randn(hidden, 2 * hidden, generator=generator) * 0.1
        else:
            tensors[name] = torch.ones(hidden)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, key: 1}))


def ragged_with_mtp(model_type: str, tmp: Path) -> Path:
    """The family's tiny model with one MTP layer, pruned to FIRST experts in the first MoE layer, LAST in the last."""
    case = CASES[model_type]
    folder = tiny_model(model_type, tmp / model_type, case.tiny)
    add_mtp_layer(folder, model_type, case.copies)
    ckpt = Checkpoint.open(folder)
    layers = ckpt.identity.moe_layers
    keep = {layer: (FIRST, LAST)[i % 2] for i, layer in enumerate(layers)} | {layers[0]: FIRST, layers[-1]: LAST}
    prune.run(folder, DropMask.create(ckpt.identity, keep, "test"), tmp / f"{model_type}_ragged")
    shutil.rmtree(folder)
    return tmp / f"{model_type}_ragged"


def transformers_greedy(folder: Path, ids: list[list[int]], steps: int) -> list[list[int]]:
    """`steps` greedy tokens after each prompt, by transformers through moe-prune's loader (no cache: tiny)."""
    model = load_model(folder, dtype="float32")
    tokens = torch.tensor(ids)
    with torch.no_grad():
        for _ in range(steps):
            tokens = torch.cat([tokens, model(tokens).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens[:, len(ids[0]) :].tolist()


@pytest.fixture(scope="module")
def served(vllm_python, tmp_path_factory) -> tuple[dict[str, Path], list[list[int]], dict]:  # noqa: F811
    tmp = tmp_path_factory.mktemp("vllm_mtp")
    folders = {model_type: ragged_with_mtp(model_type, tmp) for model_type in CASES}
    ids = torch.randint(0, 100, (2, 48), generator=torch.Generator().manual_seed(0)).tolist()
    speculative = {"method": "mtp", "num_speculative_tokens": 1}
    jobs = [
        {"name": name, "folder": str(folder), "token_ids": ids, "generate": GENERATE, "speculative_config": speculative}
        for name, folder in folders.items()
    ]
    proc = run_script(vllm_python, jobs, tmp / "out.json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return folders, ids, json.loads((tmp / "out.json").read_text())


@pytest.mark.vllm
@pytest.mark.parametrize("model_type", CASES)
def test_ragged_checkpoint_with_mtp_serves_transformers_logprobs(model_type, served):
    folders, ids, out = served
    want = transformers_logprobs(folders[model_type], ids)
    got = torch.tensor(out[model_type]["logprobs"], dtype=torch.float64)
    relative = abs(float(torch.exp(-got.mean()) / torch.exp(-want.mean())) - 1)
    largest = float((got - want).abs().max())
    print(f"{model_type}: relative perplexity difference {relative:.2e}, largest log-prob difference {largest:.2e}")
    perplexity, logprob = CASES[model_type].tolerance
    assert relative <= perplexity and largest <= logprob


@pytest.mark.vllm
@pytest.mark.parametrize("model_type", CASES)
def test_mtp_drafter_is_built_at_the_last_layers_size(model_type, served):
    folders, _, out = served
    block = json.loads((folders[model_type] / "config.json").read_text())[RAGGED_KEY]
    counts = block["experts_per_layer"]
    last = max(counts, key=int)
    assert len(set(counts.values())) > 1 and counts[last] == len(LAST)
    drafter = out[model_type]["drafter"]
    base = block["base_class"]
    assert drafter["model_class"] == PLUGIN + SERVED[base].mtp
    print(f"{model_type}: drafter {drafter['experts']}, {out[model_type]['drafts']} drafts")
    if CASES[model_type].copies == "last":
        assert drafter["experts"] and set(drafter["experts"].values()) == {counts[last]}
        assert set(drafter["top_k"].values()) == {block["top_k_per_layer"][last]}
    else:  # vLLM's MTP class builds a dense layer: no fused-MoE module to size
        assert drafter["experts"] == {}
    assert out[model_type]["drafts"] > 0, "speculative decoding made no draft: the MTP layer never ran"


@pytest.mark.vllm
@pytest.mark.parametrize("model_type", CASES)
def test_mtp_speculative_decoding_gives_the_greedy_tokens(model_type, served):
    folders, ids, out = served
    generated = out[model_type]["generated"]
    assert [len(tokens) for tokens in generated] == [GENERATE, GENERATE]
    assert generated == transformers_greedy(folders[model_type], ids, GENERATE)
