"""`profile` at scale: layer-by-layer equals whole-model, resume equals uninterrupted, two processes equal one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_profile import SEQ, assert_same_stats, settings, write_docs
from typer.testing import CliRunner

from moe_prune.artifacts.stats import Stats
from moe_prune.cli import app
from moe_prune.errors import MoePruneError
from moe_prune.runtime.resume import partial_path
from moe_prune.runtime.sequential import HiddenBuffer
from moe_prune.stages import profile as stage

ROOT = Path(__file__).resolve().parents[1]


# -- layer by layer -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model_type, spill",
    [("mixtral", False), ("deepseek_v3", True), ("qwen2_moe", False), ("gpt_oss", True), ("llama4_text", False)],
)
def test_sequential_equals_whole_model(model_type, spill, tiny, tmp_path):
    """deepseek_v3: first layer dense, sigmoid routing; gpt_oss: sliding-window layers; llama4: scaled experts."""
    folder = tiny(model_type)
    data = tmp_path / "cal.jsonl"
    write_docs(data, 7, seed=11)
    whole = stage.run(folder, str(data), settings()).stats.arrays
    budget = 64 if spill else None  # 64 bytes: the hidden states go to a memory-mapped file
    layered = stage.run(folder, str(data), settings(sequential=True, buffer_memory=budget))
    assert layered.stats.provenance["sequential"] is True
    assert whole["act_norm_sum"].sum() > 0
    assert_same_stats(layered.stats.arrays, whole, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hidden_buffer_spills_to_disk(dtype, tmp_path):
    values = torch.randn(3, 4, 5).to(dtype)
    kept = HiddenBuffer((3, 4, 5), dtype, budget=None)
    spilled = HiddenBuffer((3, 4, 5), dtype, budget=16, folder=tmp_path)
    assert not kept.spilled and spilled.spilled
    files = list(tmp_path.rglob("hidden.bin"))
    assert len(files) == 1 and files[0].stat().st_size == values.numel() * values.element_size()
    for buffer in (kept, spilled):
        buffer.tensor[1:] = values[1:]
        buffer.tensor[:1] = values[:1]
        assert torch.equal(buffer.tensor, values)
        buffer.close()
    assert not list(tmp_path.iterdir())


def test_sequential_refuses_gradients(tiny, tmp_path):
    data = tmp_path / "cal.jsonl"
    write_docs(data, 3, seed=12)
    args = ["profile", str(tiny("mixtral")), "--data", str(data), "--out", str(tmp_path / "s.npz")]
    result = CliRunner().invoke(app, [*args, "--sequential", "--gradients"])
    assert result.exit_code == 1 and "--sequential cannot collect --gradients" in result.output
    assert not (tmp_path / "s.npz").exists()


def test_buffer_memory_needs_sequential(tiny, tmp_path):
    """--buffer-memory bounds --sequential's hidden states; the whole-model profile, which buffers nothing, refuses
    it in one line instead of ignoring it (sabotage: the check removed, the profile runs and writes s.npz)."""
    data = tmp_path / "cal.jsonl"
    write_docs(data, 3, seed=12)
    args = ["profile", str(tiny("mixtral")), "--data", str(data), "--out", str(tmp_path / "s.npz")]
    result = CliRunner().invoke(app, [*args, "--buffer-memory", "2KB"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "--buffer-memory applies to --sequential only; add --sequential or leave it out" in result.output
    assert not (tmp_path / "s.npz").exists()


# -- resume ---------------------------------------------------------------------------------------


class Interrupt(Exception):
    pass


def interrupt_after(batches: int, batch_tokens: int):
    """A progress callback that stops the run once `batches` batches are done."""

    def progress(done: int, total: int) -> None:
        if done >= batches * batch_tokens:
            raise Interrupt

    return progress


@pytest.mark.parametrize("gradients", [False, True])
def test_resume_equals_uninterrupted(gradients, tiny, tmp_path):
    folder = tiny("mixtral")
    data = tmp_path / "cal.jsonl"
    write_docs(data, 11, seed=13)
    options = settings(batch_size=2, gradients=gradients, save_every=2)
    whole = stage.run(folder, str(data), options).stats.arrays
    partial = partial_path(tmp_path / "s.npz")
    with pytest.raises(Interrupt):  # 5 of 6 batches done; the last checkpoint is after batch 4
        stage.run(folder, str(data), options, interrupt_after(5, 2 * SEQ), partial=partial)
    assert partial.exists()
    seen = []
    resumed = stage.run(folder, str(data), options, lambda d, t: seen.append(d), partial=partial, resume=True)
    assert seen[0] == 4 * 2 * SEQ  # batches 1-4 were not run again
    for key, value in whole.items():
        np.testing.assert_array_equal(resumed.stats.arrays[key], value, err_msg=key)


def test_resume_refuses_other_options(tiny, tmp_path):
    folder = tiny("mixtral")
    data = tmp_path / "cal.jsonl"
    write_docs(data, 6, seed=14)
    partial = partial_path(tmp_path / "s.npz")
    with pytest.raises(Interrupt):
        stage.run(folder, str(data), settings(batch_size=2, save_every=1), interrupt_after(2, 2 * SEQ), partial=partial)
    with pytest.raises(MoePruneError, match="another model, data or options"):
        stage.run(folder, str(data), settings(batch_size=3, save_every=1), partial=partial, resume=True)


def test_cli_resume_cleans_up(tiny, tmp_path):
    folder = tiny("qwen2_moe")
    data = tmp_path / "cal.jsonl"
    write_docs(data, 5, seed=15)
    out = tmp_path / "s.npz"
    partial = partial_path(out)
    with pytest.raises(Interrupt):
        stage.run(folder, str(data), settings(batch_size=1, save_every=2), interrupt_after(3, SEQ), partial=partial)
    args = ["profile", str(folder), "--data", str(data), "--out", str(out), "--seq-len", str(SEQ)]
    result = CliRunner().invoke(app, [*args, "--samples", "1000", "--batch-size", "1", "--save-every", "2", "--resume"])
    assert result.exit_code == 0, result.output
    assert not partial.exists()
    want = stage.run(folder, str(data), settings(batch_size=1)).stats.arrays
    for key, value in want.items():
        np.testing.assert_array_equal(Stats.load(out).arrays[key], value, err_msg=key)


# -- several processes, device map ----------------------------------------------------------------


def test_two_processes_equal_one(tiny, tmp_path, free_port):
    """`accelerate launch` with two CPU processes (gloo): each profiles half, sums all-reduced, rank 0 writes."""
    folder = tiny("mixtral")
    data = tmp_path / "cal.jsonl"
    write_docs(data, 7, seed=16)
    out = tmp_path / "two.npz"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port)}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    profile = ["-m", "moe_prune", "profile", str(folder), "--data", str(data), "--out", str(out)]
    options = ["--seq-len", str(SEQ), "--batch-size", "1", "--gradients"]
    proc = subprocess.run([*launcher, *profile, *options], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = Stats.load(out)
    one = stage.run(folder, str(data), settings(batch_size=1, gradients=True)).stats
    assert two.provenance["processes"] == 2 and two.provenance["predictions"] == one.provenance["predictions"]
    forward = {k: v for k, v in one.arrays.items() if not k.startswith("grad")}
    assert_same_stats({k: two.arrays[k] for k in forward}, forward, rtol=1e-9)
    scale = np.abs(one.arrays["grad_gram"]).max()
    np.testing.assert_allclose(two.arrays["grad_gram"], one.arrays["grad_gram"], rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(two.arrays["grad_entropy"], one.arrays["grad_entropy"], rtol=1e-6)
    np.testing.assert_array_equal(two.arrays["grad_outliers"], one.arrays["grad_outliers"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.jsonl", "two.npz"]


def test_device_map_auto_equals_plain_load(tiny, tmp_path):
    folder = tiny("qwen2_moe")
    data = tmp_path / "cal.jsonl"
    write_docs(data, 4, seed=17)
    out = tmp_path / "s.npz"
    args = ["profile", str(folder), "--data", str(data), "--out", str(out), "--seq-len", str(SEQ)]
    result = CliRunner().invoke(app, [*args, "--samples", "1000", "--batch-size", "3", "--device-map", "auto"])
    assert result.exit_code == 0, result.output
    plain = stage.run(folder, str(data), settings()).stats.arrays
    assert_same_stats(Stats.load(out).arrays, plain, rtol=1e-9)
    bad = CliRunner().invoke(app, [*args, "--force", "--device-map", "balanced"])
    assert bad.exit_code == 1 and "only 'auto'" in bad.output


def test_eval_device_map_auto_equals_plain_load(tiny, tmp_path):
    folder = tiny("mixtral")
    data = tmp_path / "held.jsonl"
    write_docs(data, 4, seed=18)
    args = ["eval", str(folder), "--data", str(data), "--seq-len", str(SEQ), "--json"]
    plain, mapped = (CliRunner().invoke(app, [*args, *extra]) for extra in ([], ["--device-map", "auto"]))
    assert plain.exit_code == 0 and mapped.exit_code == 0, mapped.output
    want, got = json.loads(plain.stdout), json.loads(mapped.stdout)
    assert got["model"]["perplexity"] == pytest.approx(want["model"]["perplexity"], rel=1e-9)
    assert got["model"]["tokens_scored"] == want["model"]["tokens_scored"] > 0
