"""`finetune`: recovery of a pruned demo model, frozen groups, resume, top-k annealing, entropy penalty, accelerate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tensor_bytes
from tiny_models import save_char_tokenizer
from typer.testing import CliRunner

from moe_prune.architectures.config import ModelConfig
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.cli import app
from moe_prune.demo import DEMO_CALIBRATION, DEMO_HELDOUT, DEMO_MODEL_DIR
from moe_prune.errors import MoePruneError
from moe_prune.specs.eval import EvalSpec
from moe_prune.stages import evaluate, finetune
from moe_prune.training.batches import BatchPlan
from moe_prune.training.options import FinetuneOptions
from moe_prune.training.schedule import lr_at
from moe_prune.training.state import work_folder

DATA = str(DEMO_CALIBRATION)
SMALL = dict(seq_len=64, batch_size=4, eval_tokens=0)  # 256 tokens per step on one process


def test_finetuning_a_pruned_demo_model_lowers_held_out_loss(pruned_demo, tmp_path):
    out = tmp_path / "ft"
    options = FinetuneOptions(tokens=4096, seq_len=64, batch_size=8, lr=2e-3, eval_tokens=1024)
    result = finetune.run(pruned_demo, DATA, out, options)
    before = evaluate.run(pruned_demo, EvalSpec(data=str(DEMO_HELDOUT), seq_len=64, max_tokens=2048)).model.nll
    after = evaluate.run(out, EvalSpec(data=str(DEMO_HELDOUT), seq_len=64, max_tokens=2048)).model.nll
    assert after < before - 0.5  # measured by `eval`, an independent path: 3.30 -> ~1.5 nats
    assert result.after.loss < result.before.loss
    assert result.steps == 4096 // (8 * 64) and result.tokens_trained == 4096
    # Same tensors, names and dtypes as the input; provenance carried forward.
    source, written = Checkpoint.open(pruned_demo), Checkpoint.open(out)
    assert [(t.name, t.dtype, t.shape) for t in source.tensors] == [(t.name, t.dtype, t.shape) for t in written.tensors]
    manifest = json.loads((out / "moe_prune.json").read_text())
    assert [h["stage"] for h in manifest["history"]] == ["prune", "finetune"]
    assert written.identity == source.identity
    assert (out / "tokenizer.json").read_bytes() == (pruned_demo / "tokenizer.json").read_bytes()
    assert not work_folder(out).exists()


def test_train_router_changes_only_router_tensors(tmp_path):
    out = tmp_path / "ft"
    finetune.run(DEMO_MODEL_DIR, DATA, out, FinetuneOptions(tokens=512, lr=1e-2, train=("router",), **SMALL))
    adapter = ModelConfig.load(DEMO_MODEL_DIR / "config.json").adapter
    before, after = tensor_bytes(DEMO_MODEL_DIR), tensor_bytes(out)
    assert before.keys() == after.keys()
    routers = {n for n in before if n.endswith(adapter.router)}
    assert len(routers) == 4
    assert all(before[n] != after[n] for n in routers)
    assert all(before[n] == after[n] for n in before if n not in routers)


def test_router_warmup_trains_only_routers_for_its_steps(tmp_path):
    """With the warm-up covering the whole run, `--train all` still leaves every non-router tensor as it was."""
    out = tmp_path / "ft"
    options = FinetuneOptions(tokens=512, lr=1e-2, router_warmup_steps=2, **SMALL)
    result = finetune.run(DEMO_MODEL_DIR, DATA, out, options)
    assert result.steps == 2 and result.warnings
    adapter = ModelConfig.load(DEMO_MODEL_DIR / "config.json").adapter
    before, after = tensor_bytes(DEMO_MODEL_DIR), tensor_bytes(out)
    changed = {n for n in before if before[n] != after[n]}
    assert changed == {n for n in before if n.endswith(adapter.router)}


def test_resume_after_an_interruption_equals_the_uninterrupted_run(tmp_path):
    options = FinetuneOptions(
        tokens=6 * 512, lr=1e-3, grad_accum=2, top_k_anneal=(2, 1), entropy_weight=0.1, router_warmup_steps=1, **SMALL
    )
    finetune.run(DEMO_MODEL_DIR, DATA, tmp_path / "whole", options)

    out = tmp_path / "resumed"

    def interrupt(p: finetune.Progress) -> None:
        if p.phase == "train" and p.step == 3:
            raise KeyboardInterrupt

    saving = FinetuneOptions(**{**options.__dict__, "save_every": 2})
    with pytest.raises(KeyboardInterrupt):
        finetune.run(DEMO_MODEL_DIR, DATA, out, saving, interrupt)
    assert not out.exists() and (work_folder(out) / "run.json").exists()
    result = finetune.run(DEMO_MODEL_DIR, DATA, out, FinetuneOptions(**{**saving.__dict__, "resume": True}))
    assert result.resumed_from == 2
    assert tensor_bytes(out) == tensor_bytes(tmp_path / "whole")  # bit-identical: same data order, optimizer, RNG
    assert not work_folder(out).exists()


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "deepseek_v3", "llama4_text"])
def test_annealed_top_k_is_saved_and_a_stock_reload_routes_with_it(model_type, tiny_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "model"
    shutil.copytree(tiny_factory(model_type)[0], folder)
    save_char_tokenizer(folder)
    start = ModelConfig.load(folder / "config.json").top_k
    end = 2 if start == 1 else 1
    out = tmp_path / "ft"
    options = FinetuneOptions(tokens=3 * 128, seq_len=32, batch_size=4, lr=1e-3, eval_tokens=0, top_k_anneal=(3, end))
    finetune.run(folder, DATA, out, options)
    config = ModelConfig.load(out / "config.json")
    assert config.top_k == end != start
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    chosen = []
    adapter = config.adapter
    for layer in config.moe_layers:
        router = model.get_submodule(f"{adapter.runtime_layers}.{layer}.{adapter.runtime_router}")
        router.register_forward_hook(lambda m, a, o: chosen.append(_selection_width(o, adapter, m)))
    with torch.no_grad():
        model(torch.randint(2, 100, (2, 16)))
    assert chosen and set(chosen) == {end}


def _selection_width(output, adapter, module) -> int:
    """How many experts the reloaded router chose per token (from its own outputs, not our config)."""
    if adapter.selection_from == "router_scores":  # llama4: dense scores, non-chosen are exactly zero
        scores = output[0]
        return int((scores > 0).sum(-1).max())
    return output[2].shape[-1]  # (logits, top_k_weights, top_k_index)


def mean_router_entropy(folder: Path) -> float:
    """Mean softmax entropy of the routers on held-out text, from hooks written here (not the stage's)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    texts = [json.loads(line)["text"] for line in DEMO_HELDOUT.read_text().splitlines()[:20]]
    values = []

    def hook(module, args, output):
        p = torch.softmax(output[0].float(), dim=-1)
        values.append(float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean()))

    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(hook)
    with torch.no_grad():
        for text in texts:
            model(torch.tensor([tok(text)["input_ids"][:64]]))
    return sum(values) / len(values)


def test_entropy_penalty_lowers_router_entropy(tmp_path):
    base = dict(tokens=2048, lr=3e-3, **SMALL)
    finetune.run(DEMO_MODEL_DIR, DATA, tmp_path / "plain", FinetuneOptions(**base))
    finetune.run(DEMO_MODEL_DIR, DATA, tmp_path / "peaky", FinetuneOptions(entropy_weight=1.0, **base))
    plain, peaky = mean_router_entropy(tmp_path / "plain"), mean_router_entropy(tmp_path / "peaky")
    assert peaky < plain - 0.05


def test_batches_cover_each_epoch_once_and_processes_take_disjoint_slices():
    plan = BatchPlan(chunks=10, batch_size=2, grad_accum=1, processes=2, seed=3)
    first_epoch = torch.cat([plan.indices(s, 0, p) for s in range(3) for p in range(2)])[:10]
    assert sorted(first_epoch.tolist()) == list(range(10))
    assert torch.equal(plan.indices(7, 0, 1), BatchPlan(10, 2, 1, 2, 3).indices(7, 0, 1))  # a function of the step
    assert lr_at(0, 10, 2, 1.0) < lr_at(2, 10, 2, 1.0) == 1.0 > lr_at(9, 10, 2, 1.0) > 0


def test_two_process_accelerate_run_writes_a_loadable_checkpoint(tmp_path, free_port):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ft"
    launcher = Path(sys.executable).parent / "accelerate"
    # accelerate 1.15's `--cpu` always starts one process; torchrun (--multi_gpu) + ACCELERATE_USE_CPU gives gloo.
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).parents[1]),
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "1",
    }
    command = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port)]
    command += ["-m", "moe_prune", "finetune", "--out", str(out), "--tokens", "1024", "--seq-len", "64"]
    command += ["--batch-size", "2", "--eval-tokens", "512", "--lr", "1e-3", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)  # only the main process prints
    assert result["processes"] == 2 and result["steps"] == 1024 // (2 * 2 * 64)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tensor_bytes(out).keys() == tensor_bytes(DEMO_MODEL_DIR).keys()
    assert tensor_bytes(out) != tensor_bytes(DEMO_MODEL_DIR)
    assert model(torch.tensor([[5, 6, 7]])).logits.isfinite().all()


def _cli(*args: str) -> object:
    return CliRunner().invoke(app, ["finetune", *args])


def test_bad_input_is_refused_with_one_line_and_nothing_lost(tmp_path):
    out = tmp_path / "ft"
    small = ["--seq-len", "64", "--batch-size", "4", "--eval-tokens", "0"]
    result = _cli("--out", str(out), "--tokens", "100", *small)
    assert result.exit_code == 1 and "smaller than one optimizer step" in result.output
    result = _cli("--out", str(out), "--tokens", "512", "--top-k", "9", *small)
    assert result.exit_code == 1 and "larger than the 8 experts" in result.output
    assert not out.exists() and not work_folder(out).exists()

    options = FinetuneOptions(tokens=4 * 256, lr=1e-3, save_every=1, **SMALL)

    def interrupt(p: finetune.Progress) -> None:
        if p.phase == "train" and p.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune.run(DEMO_MODEL_DIR, DATA, out, options, interrupt)
    saved = {p: p.read_bytes() for p in work_folder(out).rglob("*") if p.is_file()}
    result = _cli("--out", str(out), "--tokens", "1024", "--lr", "2e-3", "--save-every", "1", "--resume", *small)
    assert result.exit_code == 1 and "another run (options.lr (0.001 there, 0.002 now))" in result.output
    result = _cli("--out", str(out), "--tokens", "1024", "--lr", "1e-3", *small)
    assert result.exit_code == 1 and "pass --resume" in result.output
    assert {p: p.read_bytes() for p in work_folder(out).rglob("*") if p.is_file()} == saved and not out.exists()
    with pytest.raises(MoePruneError, match="no interrupted run"):
        finetune.run(DEMO_MODEL_DIR, DATA, tmp_path / "other", FinetuneOptions(resume=True, tokens=512, **SMALL))


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """An interrupted run with saved state after step 2 (the work folder is copied by each test)."""
    root = tmp_path_factory.mktemp("interrupted")
    options = FinetuneOptions(tokens=4 * 256, lr=1e-3, save_every=1, **SMALL)

    def interrupt(p: finetune.Progress) -> None:
        if p.phase == "train" and p.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune.run(DEMO_MODEL_DIR, DATA, root / "ft", options, interrupt)
    return work_folder(root / "ft")


def _damage_state(work: Path, kind: str) -> str:
    """Damage one file of the saved state; returns the name the error must give."""
    state = next(work.glob("state-*"))
    run = work / "run.json"
    if kind == "run-garbage":
        run.write_bytes(b"\x00\x01garbage")
        return "run.json"
    if kind == "run-step-string":
        obj = json.loads(run.read_text())
        run.write_text(json.dumps({**obj, "step": str(obj["step"])}))
        return "run.json"
    if kind == "run-duplicate-key":
        run.write_text(run.read_text().replace('"step":', '"step": 1, "step":', 1))
        return "run.json"
    name = {"model": "model.safetensors", "optimizer": "optimizer.bin", "rng": "random_states_0.pkl"}[kind]
    target = state / name
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    return name


@pytest.mark.parametrize("kind", ["run-garbage", "run-step-string", "run-duplicate-key", "model", "optimizer", "rng"])
def test_resume_from_damaged_state_is_one_line_naming_the_file(interrupted, tmp_path, kind):
    out = tmp_path / "ft"
    shutil.copytree(interrupted, work_folder(out))
    blame = _damage_state(work_folder(out), kind)
    saved = {p: p.read_bytes() for p in work_folder(out).rglob("*") if p.is_file()}
    small = ["--seq-len", "64", "--batch-size", "4", "--eval-tokens", "0", "--lr", "1e-3", "--save-every", "1"]
    result = _cli("--out", str(out), "--tokens", "1024", "--resume", *small)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and blame in lines[0], result.stderr
    assert {p: p.read_bytes() for p in work_folder(out).rglob("*") if p.is_file()} == saved and not out.exists()
