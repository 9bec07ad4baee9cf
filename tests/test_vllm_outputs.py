"""Every kind of checkpoint moe-prune writes, served by vLLM (CPU build): transformers' prompt log-probs.

Beside tests/test_vllm_serving.py's uniform, refit and ragged prunes: every `merge --method` with and without
`--refit`, a finetuned ragged prune (one step, through the plugin), a
tiny GLM-4-MoE with one multi-token-prediction layer pruned with it kept and with `--drop-mtp`, and pruned
FP8 (block-quantized Qwen3-MoE) and MXFP4 (gpt-oss) checkpoints. All are served by scripts/vllm_logprobs.py in
one vLLM process (quantized ones last, as jobs that may be refused) and compared with moe-prune's own
transformers loader on the same token ids. The table of what serves is printed (`pytest -m vllm -s`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import checkpoint_tensors
from safetensors.torch import load_file
from test_mtp import with_mtp
from test_quantized import FP8_QUANTIZATION, _release_dtype, _write, mxfp4_quantize, quantized  # noqa: F401
from test_vllm_serving import cli, demo_ids, run_script, transformers_logprobs, vllm_python  # noqa: F401
from tiny_models import tiny_config
from transformers import AutoModelForCausalLM

from moe_prune.architectures.config import RAGGED_KEY
from moe_prune.artifacts.mask import DropMask
from moe_prune.checkpoint.ragged import ragged_architecture
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.stages import prune

TOLERANCE = 1e-4  # relative perplexity difference, float32 on both sides
METHODS = ("uncurl", "frequency", "hcsmoe", "prune")
QUANTIZED = ("fp8", "mxfp4")  # served in bfloat16 (vLLM's fp8/mxfp4 take no float32); a refusal is recorded
KNOWN_REFUSALS = {
    "fp8": ("Failed to find a kernel that can implement the ScaledMM", "AMX tile support", "CHECK_EQ(mat1.size(1), K)"),
    "mxfp4": ("No MXFP4 MoE backend supports", "pipeline model parallel group is not initialized"),
}


def relative_difference(got: list[list[float]], want: torch.Tensor) -> float:
    got_t = torch.tensor(got, dtype=torch.float64)
    return abs(float(torch.exp(-got_t.mean()) / torch.exp(-want.mean())) - 1)


def tiny_random(model_type: str, folder: Path, **overrides) -> Path:
    """A tiny random model (heads of 32 at least: vLLM's CPU attention has no smaller head size)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    with torch.no_grad():  # default init is tiny; experts and routers must matter for the check to fail
        for name, param in model.named_parameters():
            if any(part in name for part in ("experts", "gate", "router")):
                param.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    return folder


def mxfp4_gpt_oss(root: Path) -> Path:
    """Tiny gpt-oss with MXFP4 experts as the release stores them (test_quantized's quantizer), heads of 64."""
    float_folder = tiny_random("gpt_oss", root / "float", hidden_size=64, intermediate_size=64, head_dim=64)
    config = json.loads((float_folder / "config.json").read_text())
    stored = {}
    for name, tensor in load_file(float_folder / "model.safetensors").items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            stored[name + "_blocks"], stored[name + "_scales"] = mxfp4_quantize(tensor.float())
        else:
            stored[name] = _release_dtype(name, tensor)
    quant = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "lm_head"]}
    _write(root / "mxfp4", stored, {**config, "dtype": "bfloat16", "quantization_config": quant})
    return root / "mxfp4"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, quantized) -> dict[str, tuple[Path, list[list[int]]]]:  # noqa: F811
    """name -> (folder, token ids) of every output kind checked here."""
    tmp = tmp_path_factory.mktemp("outputs")
    stats = str(tmp / "s.npz")
    cli("profile", "--samples", "16", "--seq-len", "128", "--refit-stats", "--expert-outputs", "--out", stats)
    made = {}
    for method in METHODS:
        for refit in ((), ("--refit",)):
            name = f"merge_{method}{'_refit' if refit else ''}"
            cli("merge", "--stats", stats, "--method", method, *refit, "--keep", "4", "--out", str(tmp / name))
            made[name] = tmp / name
    cli("score", stats, "-c", "soft-counts", "--ratio", "0.5", "--global", "--out", str(tmp / "g.json"))
    cli("prune", "--mask", str(tmp / "g.json"), "--out", str(tmp / "ragged"))
    ft = ("--tokens", "128", "--seq-len", "64", "--batch-size", "2", "--eval-tokens", "0", "--lr", "1e-3")
    cli("finetune", str(tmp / "ragged"), *ft, "--out", str(tmp / "finetuned_ragged"))
    made["finetuned_ragged"] = tmp / "finetuned_ragged"
    demo = {name: (folder, demo_ids()) for name, folder in made.items()}

    glm = tiny_random("glm4_moe", tmp / "glm4_moe", head_dim=32)
    mtp_folder = with_mtp(lambda _: glm, "glm4_moe", tmp)[0]
    tiny = {
        "mtp_kept": prune_first(mtp_folder, 4, tmp / "mtp_kept"),
        "mtp_dropped": prune_first(mtp_folder, 4, tmp / "mtp_dropped", drop_mtp=True),
        "fp8": prune_first(quantized("qwen3_moe")[0], 4, tmp / "fp8"),
        "mxfp4": prune_first(mxfp4_gpt_oss(tmp / "gpt_oss"), 2, tmp / "mxfp4"),
    }
    ids = torch.randint(0, 100, (2, 64), generator=torch.Generator().manual_seed(0)).tolist()
    return {**demo, **{name: (folder, ids) for name, folder in tiny.items()}}


def prune_first(folder: Path, keep: int, out: Path, drop_mtp: bool = False) -> Path:
    """`folder` with the first `keep` experts of every MoE layer kept (a uniform prune)."""
    ckpt = Checkpoint.open(folder)
    kept = {layer: list(ckpt.identity.original_ids[layer][:keep]) for layer in ckpt.identity.moe_layers}
    prune.run(folder, DropMask.create(ckpt.identity, kept, "test"), out, drop_mtp=drop_mtp)
    return out


@pytest.fixture(scope="module")
def served(vllm_python, outputs, tmp_path_factory) -> dict[str, dict]:  # noqa: F811
    jobs = [
        {"name": name, "folder": str(folder), "token_ids": ids}
        | ({"expect_error": True, "dtype": "bfloat16"} if name in QUANTIZED else {})
        for name, (folder, ids) in outputs.items()
    ]
    out = tmp_path_factory.mktemp("vllm_outputs") / "served.json"
    proc = run_script(vllm_python, jobs, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    print("\n| output kind | served by vLLM CPU | relative perplexity difference |\n|---|---|---:|")
    for name, (folder, ids) in outputs.items():
        if "error" in results[name]:
            print(f"| {name} | no: {' '.join(results[name]['error'].split())[:400]} | |")
        else:
            diff = relative_difference(results[name]["logprobs"], transformers_logprobs(folder, ids))
            print(f"| {name} | yes ({results[name]['model_class'].rsplit('.', 1)[-1]}) | {diff:.1e} |")
    return results


@pytest.mark.vllm
@pytest.mark.parametrize(
    "name",
    [*(f"merge_{m}{r}" for m in METHODS for r in ("", "_refit")), "finetuned_ragged", "mtp_kept", "mtp_dropped"],
)
def test_output_serves_with_transformers_perplexity(name, outputs, served):
    folder, ids = outputs[name]
    assert "error" not in served[name], served[name]
    relative = relative_difference(served[name]["logprobs"], transformers_logprobs(folder, ids))
    assert relative <= TOLERANCE, f"{name}: {relative:.2e}"


@pytest.mark.vllm
def test_finetuned_ragged_is_served_by_the_plugin_at_its_own_sizes(outputs, served):
    config = json.loads((outputs["finetuned_ragged"][0] / "config.json").read_text())
    counts = config[RAGGED_KEY]["experts_per_layer"]
    assert config["architectures"] == [ragged_architecture(config[RAGGED_KEY]["base_class"])]
    built = {key.split(".layers.")[1].split(".")[0]: n for key, n in served["finetuned_ragged"]["experts"].items()}
    assert built == counts and len(set(counts.values())) > 1


@pytest.mark.vllm
def test_mtp_layer_kept_or_dropped_as_asked(outputs):
    kept = json.loads((outputs["mtp_kept"][0] / "config.json").read_text())
    dropped = json.loads((outputs["mtp_dropped"][0] / "config.json").read_text())
    assert (kept["num_nextn_predict_layers"], dropped["num_nextn_predict_layers"]) == (1, 0)
    layer = f"model.layers.{kept['num_hidden_layers']}."
    assert any(k.startswith(layer) for k in checkpoint_tensors(outputs["mtp_kept"][0]))
    assert not any(k.startswith(layer) for k in checkpoint_tensors(outputs["mtp_dropped"][0]))


@pytest.mark.vllm
@pytest.mark.parametrize("name", QUANTIZED)
def test_quantized_output_serves_or_is_refused_in_one_known_way(name, outputs, served):
    """Recorded either way (the table above); a served quantized checkpoint must be close to transformers'
    dequantized one (vLLM may quantize activations too, so not to float32 precision)."""
    folder, ids = outputs[name]
    if "error" in served[name]:
        error = served[name]["error"]
        # vLLM CPU's own kernel refusals (messages differ by CPU); any other error is a checkpoint moe-prune broke
        assert any(known in error for known in KNOWN_REFUSALS[name]), error
        pytest.skip(f"vLLM CPU refuses {name}: {error[:300]}")
    assert relative_difference(served[name]["logprobs"], transformers_logprobs(folder, ids)) <= 0.05
