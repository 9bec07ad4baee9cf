"""A ragged checkpoint that keeps its multi-token-prediction layer, served by vLLM (CPU build) through the plugin,
with and without MTP speculative decoding (`speculative_config={"method": "mtp"}`).

A tiny random GLM-4-MoE with one MTP layer, pruned to 5 and 2 experts (the last MoE layer, whose experts the MTP
layer keeps, is the smaller: vLLM's stock MTP class would build it at 5 and fail to load). Checked: prompt
log-probs equal transformers' (the MTP layer takes no part in them); with MTP drafting on, vLLM built the plugin's
MTP class at the last layer's count and top-k, drafted, and greedy decoding gave the same tokens as without
(speculative decoding with greedy acceptance changes speed, never the output). Marked `vllm`: `pytest -m vllm`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_vllm_serving import TOLERANCE, run_script, transformers_logprobs, vllm_python  # noqa: F401
from vllm_tiny import TINY_RAGGED

from moe_prune.architectures.config import RAGGED_KEY

FAMILY = "glm4_moe"
KEEP = ([0, 2, 3, 5, 7], [6, 1])  # experts kept by the first and the last MoE layer
GENERATE = 8
PLUGIN = "moe_prune.serving.vllm_plugin.Ragged"


def ragged_with_mtp(tmp: Path) -> Path:
    """tests/vllm_tiny.py's GLM-4-MoE (heads vLLM CPU takes), one MTP layer added, pruned to KEEP."""
    from test_mtp import with_mtp
    from tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    from moe_prune.artifacts.mask import DropMask
    from moe_prune.checkpoint.source import Checkpoint
    from moe_prune.stages import prune

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(FAMILY, **TINY_RAGGED[FAMILY].overrides))
    with torch.no_grad():  # default init is tiny; experts and routers must matter
        for name, param in model.named_parameters():
            if "correction_bias" in name:
                param.normal_(0.0, TINY_RAGGED[FAMILY].bias)
            elif any(part in name for part in ("experts", "gate")):
                param.normal_(0.0, 0.3)
    model.save_pretrained(tmp / "plain")
    folder, *_ = with_mtp(lambda _: tmp / "plain", FAMILY, tmp)
    ckpt = Checkpoint.open(folder)
    keep = {layer: KEEP[i % len(KEEP)] for i, layer in enumerate(ckpt.identity.moe_layers)}
    prune.run(folder, DropMask.create(ckpt.identity, keep, "test"), tmp / "ragged")
    return tmp / "ragged"


@pytest.fixture(scope="module")
def served(vllm_python, tmp_path_factory) -> tuple[Path, list[list[int]], dict]:  # noqa: F811
    tmp = tmp_path_factory.mktemp("vllm_mtp")
    folder = ragged_with_mtp(tmp)
    ids = torch.randint(0, 100, (2, 48), generator=torch.Generator().manual_seed(0)).tolist()
    job = {"folder": str(folder), "token_ids": ids, "generate": GENERATE}
    speculative = {"method": "mtp", "num_speculative_tokens": 1}
    jobs = [{"name": "plain", **job}, {"name": "mtp", **job, "speculative_config": speculative}]
    proc = run_script(vllm_python, jobs, tmp / "out.json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return folder, ids, json.loads((tmp / "out.json").read_text())


@pytest.mark.vllm
def test_ragged_checkpoint_with_mtp_serves_transformers_logprobs(served):
    folder, ids, out = served
    want = transformers_logprobs(folder, ids)
    for name in ("plain", "mtp"):
        got = torch.tensor(out[name]["logprobs"], dtype=torch.float64)
        relative = abs(float(torch.exp(-got.mean()) / torch.exp(-want.mean())) - 1)
        print(f"{name}: relative perplexity difference {relative:.2e}")
        assert relative <= TOLERANCE and torch.allclose(got, want, atol=1e-3)


@pytest.mark.vllm
def test_mtp_drafter_is_built_at_the_last_layers_size(served):
    folder, _, out = served
    block = json.loads((folder / "config.json").read_text())[RAGGED_KEY]
    last = max(block["experts_per_layer"], key=int)
    assert len(set(block["experts_per_layer"].values())) > 1 and block["experts_per_layer"][last] == len(KEEP[-1])
    drafter = out["mtp"]["drafter"]
    assert drafter["model_class"] == PLUGIN + "Glm4MoeMTPModel"
    assert drafter["experts"] and set(drafter["experts"].values()) == {block["experts_per_layer"][last]}
    assert set(drafter["top_k"].values()) == {block["top_k_per_layer"][last]}
    assert out["mtp"]["drafts"] > 0, "speculative decoding made no draft: the MTP layer never ran"


@pytest.mark.vllm
def test_mtp_speculative_decoding_gives_the_greedy_tokens(served):
    _, _, out = served
    assert [len(tokens) for tokens in out["plain"]["generated"]] == [GENERATE, GENERATE]
    assert out["mtp"]["generated"] == out["plain"]["generated"]
