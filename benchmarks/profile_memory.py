"""Peak memory of `moe-prune profile --sequential` vs whole-model profiling, and vs 10x the calibration tokens.

    python -m benchmarks.profile_memory                     # random 8L h1024 64E top8 MoE (3.3 GB float32)
    python -m benchmarks.profile_memory --model /path/to/checkpoint --samples 32 --seq-len 512

Each profile runs as its own process under GNU time (peak resident memory of that process alone).
Targets: sequential peak at most 0.3x the whole-model peak for a model of at least 2 GB, tokens/s
within 1.5x; whole-model peak at 10x the tokens within 10% of the smaller run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from benchmarks.common import build_random_moe, machine, python, run_measured
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.demo import DEMO_MODEL_DIR


def write_data(path: Path, documents: int) -> None:
    """Random printable text: enough documents for the largest run."""
    generator = torch.Generator().manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz      .,"
    with path.open("w") as handle:
        for _ in range(documents):
            picks = torch.randint(0, len(letters), (2000,), generator=generator).tolist()
            handle.write(json.dumps({"text": "".join(letters[i] for i in picks)}) + "\n")


def with_tokenizer(folder: Path) -> Path:
    """The random model borrows the demo tokenizer (its ids fit any vocabulary of 2048 or more)."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (folder / name).exists():
            shutil.copy(DEMO_MODEL_DIR / name, folder / name)
    return folder


def profile(
    model: Path, data: Path, out: Path, samples: int, seq_len: int, batch: int, *extra: str
) -> tuple[float, int]:
    cmd = [python(), "-m", "moe_prune", "profile", str(model), "--data", str(data), "--out", str(out), "--force"]
    cmd += ["--samples", str(samples), "--seq-len", str(seq_len), "--batch-size", str(batch), *extra]
    return run_measured(cmd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: a random MoE)")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "moe-prune-bench")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model = args.model or with_tokenizer(
        build_random_moe(args.work_dir / "random-64e", 8, 1024, 512, 64, 8, dtype=torch.float32)
    )
    data = args.work_dir / "profile-memory.jsonl"
    write_data(data, 20 * args.samples * args.seq_len // 1000 + 10)
    out = args.work_dir / "profile-memory.npz"
    size = Checkpoint.open(model).total_bytes()
    tokens = args.samples * args.seq_len
    print(f"machine: {machine()}")
    print(
        f"model {model} ({size / 1e9:.2f} GB on disk); {args.samples} x {args.seq_len} tokens, batch {args.batch_size}"
    )
    whole_s, whole_b = profile(model, data, out, args.samples, args.seq_len, args.batch_size)
    seq_s, seq_b = profile(model, data, out, args.samples, args.seq_len, args.batch_size, "--sequential")
    big_s, big_b = profile(model, data, out, 10 * args.samples, args.seq_len, args.batch_size)
    rows = [
        ("whole model", tokens, whole_s, whole_b),
        ("--sequential", tokens, seq_s, seq_b),
        ("whole model, 10x tokens", 10 * tokens, big_s, big_b),
    ]
    print(f"{'run':<26} {'tokens':>7} {'wall s':>7} {'tok/s':>7} {'peak RSS':>9}")
    for name, count, wall, peak in rows:
        print(f"{name:<26} {count:7d} {wall:7.1f} {count / wall:7.1f} {peak / 2**30:7.2f} GiB")
    print(f"sequential / whole peak memory: {seq_b / whole_b:.3f}  (target <= 0.30)")
    print(f"sequential / whole wall time:   {seq_s / whole_s:.3f}  (target <= 1.50; includes loading)")
    print(f"10x tokens / 1x peak memory:    {big_b / whole_b:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
