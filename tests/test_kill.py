"""kill -9 in the middle of writing: the output is absent or complete, and the rerun equals an uninterrupted run.

Each command runs in its own process and is killed (SIGKILL: no cleanup runs) as soon as it has
started writing (its temporary folder or its resumable state exists). The rerun then removes the
killed run's leftovers (it can prove them its own and dead) and produces what an uninterrupted run does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import checkpoint_tensors
from tiny_models import save_char_tokenizer
from typer.testing import CliRunner

from moe_prune.artifacts.stats import Stats
from moe_prune.cli import app
from moe_prune.runtime.resume import partial_path
from moe_prune.training.state import work_folder

TEXT = "\n\n".join(f"Line {i}: the {i % 7} crates of {i * 13 % 17} sold at {i % 5} o'clock." for i in range(400))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A model big enough that writing it takes a while (~50 MB), its tokenizer, statistics, mask and text."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("kill")
    config = AutoConfig.for_model(
        "mixtral", vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "model", max_shard_size="10MB")
    save_char_tokenizer(root / "model")
    (root / "data.txt").write_text(TEXT)
    run_cli(["profile", str(root / "model"), "--data", str(root / "data.txt"), "--samples", "4", "--seq-len", "16",
             "--out", str(root / "stats.npz")])  # fmt: skip
    run_cli(["score", str(root / "stats.npz"), "--criterion", "usage-frequency", "--ratio", "0.5",
             "--out", str(root / "mask.json")])  # fmt: skip
    return root


def run_cli(argv: list[str]) -> None:
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, (argv, result.stderr, result.exception)


def kill_when_ready(argv: list[str], ready: Callable[[], bool], timeout: float = 240) -> bool:
    """Run `moe-prune argv` in a process; SIGKILL it once `ready()`; True if it was killed before finishing."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "moe_prune", *argv], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.0005)
    assert proc.wait() == 0, proc.stderr.read()
    return False


def temporaries(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.tmp-*"))


def assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    assert (a / "config.json").read_text() == (b / "config.json").read_text()


@pytest.mark.parametrize("command", ["prune", "merge"])
def test_killed_surgery_leaves_nothing_half_written_and_the_rerun_cleans_up(workspace, tmp_path, command):
    model = str(workspace / "model")
    extra = (
        ["--mask", str(workspace / "mask.json")]
        if command == "prune"
        else ["--stats", str(workspace / "stats.npz"), "--keep", "4"]
    )
    argv = [command, model, *extra, "--max-shard-size", "10MB"]
    reference = tmp_path / "reference"
    run_cli([*argv, "--out", str(reference)])
    out = tmp_path / "out"
    killed = kill_when_ready([*argv, "--out", str(out)], lambda: bool(temporaries(out)))
    assert killed, "the run finished before it could be killed"
    assert not out.exists(), "a killed run left an output"
    assert temporaries(out), "kill -9 runs no cleanup: its temporary folder is still there"
    run_cli([*argv, "--out", str(out)])
    assert not temporaries(out), "the rerun did not remove the dead run's temporary folder"
    assert_same_checkpoint(out, reference)


def test_killed_profile_resumes_to_the_uninterrupted_statistics(workspace, tmp_path):
    argv = ["profile", str(workspace / "model"), "--data", str(workspace / "data.txt"), "--samples", "48",
            "--seq-len", "16", "--batch-size", "1", "--save-every", "1"]  # fmt: skip
    reference = tmp_path / "reference.npz"
    run_cli([*argv, "--out", str(reference)])
    out = tmp_path / "stats.npz"
    killed = kill_when_ready([*argv, "--out", str(out)], lambda: partial_path(out).exists())
    assert killed and not out.exists()
    run_cli([*argv, "--out", str(out), "--resume"])
    assert not partial_path(out).exists() and not temporaries(partial_path(out)) and not temporaries(out)
    want, got = Stats.load(reference).arrays, Stats.load(out).arrays
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_killed_finetune_resumes_to_the_uninterrupted_checkpoint(workspace, tmp_path):
    argv = ["finetune", str(workspace / "model"), "--data", str(workspace / "data.txt"), "--tokens", "1024",
            "--seq-len", "16", "--batch-size", "4", "--lr", "1e-3", "--eval-tokens", "0",
            "--save-every", "2"]  # fmt: skip
    reference = tmp_path / "reference"
    run_cli([*argv, "--out", str(reference)])
    out = tmp_path / "out"
    work = work_folder(out)
    killed = kill_when_ready([*argv, "--out", str(out)], lambda: (work / "run.json").exists())
    assert killed and not out.exists()
    run_cli([*argv, "--out", str(out), "--resume"])
    assert not work.exists() and not temporaries(out)
    assert_same_checkpoint(out, reference)
