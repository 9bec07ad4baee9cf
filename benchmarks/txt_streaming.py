"""Peak memory and time of `moe-prune profile` on a large .txt: tokenized piece by piece vs in one piece.

    python -m benchmarks.txt_streaming                       # demo model, 8.4 MB of generated text, --samples 64
    python -m benchmarks.txt_streaming --megabytes 33.5 --samples 256

A .txt file is one document. Profile reads 4 x samples x seq_len x 16 characters of it (seq_len 2048 by
default, capped at the model's context only after reading), so one document of millions of characters
is tokenized. The baseline, measured in the same run, is the tokenization before issue #19: the whole
document in one tokenizer call (`runtime.data.PIECE_CHARS` set beyond its length). Streaming tokenizes
windows of PIECE_CHARS characters and stops once the run has its tokens. Each profile runs as its own
process under GNU time (peak resident memory of that process alone). Target: peak RSS of streaming
at most 0.5x the one-piece peak, and no slower.

Recorded 2026-12-06 (2 CPU cores, torch 2.13.0+cpu, demo model): 8.4 MB, --samples 64: one piece 20.1 s /
2.14 GB, piece by piece 7.5 s / 0.61 GB (0.37x time, 0.28x peak); 33.5 MB, --samples 256: one piece
67.3 s / 6.77 GB, piece by piece 12.9 s / 0.65 GB (0.19x, 0.10x). --split-on blank-lines: 0.59 / 0.66 GB.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

from benchmarks.common import machine, python, run_measured
from moe_prune.demo import DEMO_MODEL_DIR

ONE_PIECE = "import moe_prune.runtime.data as d; d.PIECE_CHARS = 1 << 62; from moe_prune.cli import main; main()"
WORDS = [
    "the",
    "a",
    "trader",
    "sold",
    "crates",
    "at",
    "dawn",
    "while",
    "river",
    "ships",
    "waited",
    "for",
    "tide",
    "and",
    "weather",
    "in",
    "port",
]


def write_text(path: Path, megabytes: float) -> None:
    """Running text: random words in sentences and lines, paragraphs separated by blank lines."""
    rng = random.Random(0)
    target = int(megabytes * 1e6)
    with path.open("w") as handle:
        written = 0
        while written < target:
            line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))).capitalize() + ".\n"
            line += "\n" if rng.random() < 0.2 else ""
            handle.write(line)
            written += len(line)


def profile(model: Path, data: Path, out: Path, samples: int, one_piece: bool, *extra: str) -> tuple[float, int]:
    head = [python(), "-c", ONE_PIECE] if one_piece else [python(), "-m", "moe_prune"]
    cmd = [*head, "profile", str(model), "--data", str(data), "--out", str(out), "--force", "--samples", str(samples)]
    return run_measured([*cmd, *extra])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument("--megabytes", type=float, default=8.4)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "moe-prune-bench")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    data = args.work_dir / f"streaming-{args.megabytes:g}MB.txt"
    if not data.exists():
        write_text(data, args.megabytes)
    out = args.work_dir / "streaming.npz"
    print(f"machine: {machine()}")
    print(f"model {args.model}; {data} ({data.stat().st_size / 1e6:.1f} MB); --samples {args.samples}")
    rows = [
        ("one piece (before)", *profile(args.model, data, out, args.samples, True)),
        ("piece by piece", *profile(args.model, data, out, args.samples, False)),
        ("--split-on blank-lines", *profile(args.model, data, out, args.samples, False, "--split-on", "blank-lines")),
    ]
    base_s, base_b = rows[0][1], rows[0][2]
    print("| tokenization | wall s | peak RSS GB | time ratio | peak ratio |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds, peak in rows:
        print(f"| {name} | {seconds:.1f} | {peak / 1e9:.2f} | {seconds / base_s:.2f} | {peak / base_b:.2f} |")


if __name__ == "__main__":
    main()
