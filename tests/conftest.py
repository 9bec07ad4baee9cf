"""Shared fixtures: tiny random checkpoints of every family, built once per session."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Remote code that transformers imports is cached here, never in the user's ~/.cache.
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="moe-prune-test-modules-"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import typer.main
import typer.testing
from tiny_models import build_tiny, save_char_tokenizer

_COMMANDS: dict[int, tuple[object, object]] = {}


def _built_once(app: typer.Typer) -> object:
    """typer's CliRunner rebuilds the whole click command tree (every option's type hints) on each invoke: ~3/4 of
    a hostile case's time. The tree is static, so build it once per app (the app is kept, so its id stays unique)."""
    if id(app) not in _COMMANDS:
        _COMMANDS[id(app)] = (app, typer.main.get_command(app))
    return _COMMANDS[id(app)][1]


typer.testing._get_command = _built_once

_CACHE: dict[str, tuple[Path, object]] = {}


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and thread spin-waits crawl on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def free_port() -> int:
    """A TCP port free right now on the loopback interface (for torch.distributed rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
    """`tiny_factory(model_type)` -> (folder, model in eval mode), saved once per session."""

    def make(model_type: str):
        if model_type not in _CACHE:
            folder = tmp_path_factory.mktemp(model_type) / "model"
            _CACHE[model_type] = (folder, build_tiny(model_type, folder))
        return _CACHE[model_type]

    return make


@pytest.fixture(scope="session")
def demo_stats():
    """`profile` statistics of the shipped demo model: 32 calibration windows of 256 tokens (seed 0)."""
    from moe_prune.demo import DEMO_CALIBRATION, DEMO_MODEL_DIR
    from moe_prune.stages import profile

    settings = profile.Settings(samples=32, seq_len=256, seed=0, batch_size=8)
    return profile.run(DEMO_MODEL_DIR, str(DEMO_CALIBRATION), settings).stats


@pytest.fixture(scope="session")
def demo_perplexity():
    """`demo_perplexity(folder)`: held-out perplexity on the demo's held-out split, first 8192 tokens, seq 256."""
    from moe_prune.demo import DEMO_HELDOUT
    from moe_prune.specs.eval import EvalSpec
    from moe_prune.stages import evaluate

    def run(folder) -> float:
        return evaluate.run(
            folder, EvalSpec(data=str(DEMO_HELDOUT), seq_len=256, batch_size=16, max_tokens=8192)
        ).model.perplexity

    return run


@pytest.fixture(scope="session")
def tiny(tiny_factory):
    """`tiny(model_type)` -> folder of a tiny random model with a character tokenizer (shared, read-only)."""

    def make(model_type: str):
        folder, _ = tiny_factory(model_type)
        if not (folder / "tokenizer.json").exists():
            save_char_tokenizer(folder)
        return folder

    return make


@pytest.fixture(scope="session")
def pruned_demo(tmp_path_factory):
    """The demo model with half its experts dropped (0-3 kept): a damaged model that finetuning should repair."""
    from moe_prune.artifacts.mask import DropMask
    from moe_prune.checkpoint.source import Checkpoint
    from moe_prune.demo import DEMO_MODEL_DIR
    from moe_prune.stages import prune

    ckpt = Checkpoint.open(DEMO_MODEL_DIR)
    keep = {layer: [0, 1, 2, 3] for layer in ckpt.identity.moe_layers}
    out = tmp_path_factory.mktemp("pruned") / "model"
    prune.run(DEMO_MODEL_DIR, DropMask.create(ckpt.identity, keep, "test"), out)
    return out
