"""Shared helpers of the benchmark scripts: test models, timers, peak memory of a child process.

Every benchmark compares moe-prune against a baseline measured in the same run on the same machine
(a bare forward loop, a plain file copy), and prints the ratio; absolute seconds are context only.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

DEMO = "demo"


def machine() -> str:
    """One line naming the machine, for the figures table."""
    cpu = platform.processor() or platform.machine()
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()} CPUs ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads{gpu}"


def best_of(fn: Callable[[], object], repeats: int = 3) -> float:
    """Fastest wall time of `repeats` calls: the least disturbed by other work on the machine."""
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak resident bytes) of a command, measured by GNU time around it.

    GNU time reports the peak of the exec'd program alone; rusage of a child forked from this
    (possibly large) Python process would count the parent's pages it started with.
    """
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        timed = ["/usr/bin/time", "-f", "%e %M", "-o", report.name, *cmd]
        proc = subprocess.run(timed, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"benchmark command failed: {' '.join(cmd)}\n{proc.stderr}")
        wall, kib = report.read().split()[-2:]
    return float(wall), int(kib) * 1024


def build_random_moe(
    out: Path,
    layers: int,
    hidden: int,
    intermediate: int,
    experts: int,
    top_k: int,
    vocab: int = 32000,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str = "1GB",
) -> Path:
    """A random-weight Mixtral-layout MoE saved as a sharded checkpoint (reused when already there)."""
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 256),
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    tmp.rename(out)
    return out


def python() -> str:
    return sys.executable


def add_model_options(parser: Any, sequences: int) -> None:
    """The options every forward-loop benchmark shares: which models, where, how many tokens."""
    parser.add_argument("--models", nargs="+", default=[DEMO, "random"], help="demo, random, or checkpoint folders")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--sequences", type=int, default=sequences)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "moe-prune-bench")


def resolve_model(name: str, work_dir: Path) -> tuple[str, Path]:
    """(label, folder) of `demo`, `random` (built once: 8 layers, hidden 1024, 64 experts, top-8) or a folder."""
    from moe_prune.demo import DEMO_MODEL_DIR

    if name == DEMO:
        return name, DEMO_MODEL_DIR
    if name == "random":
        return "random 8L h1024 64E top8", build_random_moe(
            work_dir / "random-64e", 8, 1024, 512, 64, 8, dtype=torch.float32
        )
    return name, Path(name)
