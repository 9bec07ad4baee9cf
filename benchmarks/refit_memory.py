"""Peak memory and time of `merge --refit`: the two-step path (profile --refit-stats, then merge) vs one pass.

    python -m benchmarks.refit_memory                                  # demo and a random 4L h1024 64E model
    python -m benchmarks.refit_memory --models demo --samples 64 --keep 2

Two-step: `profile --sequential --refit-stats` stores E x I x (I + H) float64 per layer for every layer, then
`merge --refit` solves from them. One pass: `profile --sequential` (no refit sums), then `merge --refit`
re-reads the same windows and solves each layer during one layer-by-layer pass (`merging.refit_pass`).
Every command runs as its own process under GNU time (peak resident memory of that process alone); the
table gives each step, the statistics file's size and the sums one layer needs on each path.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import build_random_moe, machine, python, run_measured
from benchmarks.profile_memory import with_tokenizer, write_data
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.demo import DEMO_CALIBRATION, DEMO_MODEL_DIR


def model_folder(name: str, work: Path) -> tuple[str, Path]:
    if name == "demo":
        return "demo (4L h128 8E top2)", DEMO_MODEL_DIR
    if name == "random":
        folder = build_random_moe(work / "random-4l-64e", 4, 1024, 512, 64, 8, vocab=2048)
        return "random 4L h1024 I512 64E top8", with_tokenizer(folder)
    return name, Path(name)


def sums_bytes(folder: Path, slots: int | None) -> int:
    """float64 bytes of one layer's refit sums for `slots` experts (all experts: None)."""
    config = Checkpoint.open(folder).config
    inner = config.get("moe_intermediate_size") or config.get("intermediate_size")
    return (slots or config.num_experts) * inner * (inner + config.get("hidden_size")) * 8


def run(label: str, folder: Path, data: Path, work: Path, samples: int, seq_len: int, keep: int) -> list[tuple]:
    cli = [python(), "-m", "moe_prune"]
    base = [str(folder), "-d", str(data), "--samples", str(samples), "--seq-len", str(seq_len), "--sequential"]
    rows = []
    for path, flags in (("two-step", ["--refit-stats"]), ("one pass", [])):
        stats = work / f"{path.replace(' ', '-')}.npz"
        out = work / f"{path.replace(' ', '-')}-merged"
        wall, peak = run_measured([*cli, "profile", *base, *flags, "-o", str(stats), "--force"])
        rows.append((label, path, "profile", wall, peak, stats.stat().st_size))
        merge = ["merge", str(folder), "-s", str(stats), "-k", str(keep), "--refit", "-o", str(out), "--force"]
        wall, peak = run_measured([*cli, *merge])
        rows.append((label, path, "merge --refit", wall, peak, None))
    print(
        f"{label}: one layer's sums {sums_bytes(folder, None) / 1e6:.1f} MB (all experts, stored for every layer) "
        f"vs {sums_bytes(folder, keep) / 1e6:.1f} MB (the {keep} slots, one layer at a time)"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["demo", "random"])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--keep", type=int, default=0, help="slots per layer (default: a quarter of the experts)")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "moe-prune-bench")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    print(machine())
    rows = []
    for name in args.models:
        label, folder = model_folder(name, args.work_dir)
        data = DEMO_CALIBRATION if name == "demo" else args.work_dir / "refit-data.jsonl"
        if name != "demo" and not data.exists():
            write_data(data, 4 * args.samples)
        keep = args.keep or max(1, Checkpoint.open(folder).config.num_experts // 4)
        rows += run(label, folder, data, args.work_dir, args.samples, args.seq_len, keep)
    print("| model | path | step | wall s | peak RSS | statistics file |")
    print("|---|---|---|---:|---:|---:|")
    for label, path, step, wall, peak, size in rows:
        stats = "" if size is None else f"{size / 1e6:.1f} MB"
        print(f"| {label} | {path} | {step} | {wall:.1f} | {peak / 1e9:.2f} GB | {stats} |")


if __name__ == "__main__":
    main()
