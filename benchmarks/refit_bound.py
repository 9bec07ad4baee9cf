"""Peak memory of `merge --refit`'s layer-by-layer pass with and without `--refit-memory`, in one run.

    python -m benchmarks.refit_bound                       # random 2L h256 I4096 8E top2, 4 slots per layer
    python -m benchmarks.refit_bound --inner 2048 --keep 8

The shapes make the refit sums the pass's largest allocation, as on DeepSeek-V3 (one slot's sums there are
I x (I + H) x 8 = 151 MB, 128 slots 19 GB): here one slot's sums are I x (I + 256) x 8 bytes (143 MB at
I = 4096). One `profile --sequential`, then three merges of the same statistics, each its own process under
GNU time: a plain merge (no refit: the process without the pass), `--refit --refit-memory 1TB` (every slot
of a layer at once: the pass without a bound) and `--refit --refit-memory` one slot's sums. Printed: wall
time and peak RSS of each, the ratio of the two refit peaks, and the ratio of what the pass adds over the
plain merge. The written down projections are compared: the bound changes memory and time, not the result.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import build_random_moe, machine, python, run_measured
from benchmarks.profile_memory import with_tokenizer, write_data


def down_projections(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update({k: v for k, v in load_file(file).items() if k.endswith("w2.weight")})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--inner", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--keep", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "moe-prune-bench")
    args = parser.parse_args()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    print(machine())
    name = f"refit-{args.layers}l-h{args.hidden}-i{args.inner}-{args.experts}e"
    folder = with_tokenizer(build_random_moe(work / name, args.layers, args.hidden, args.inner, args.experts, 2, 2048))
    data = work / "refit-bound-data.jsonl"
    if not data.exists():
        write_data(data, 4 * args.samples)
    cli = [python(), "-m", "moe_prune"]
    stats = work / f"{name}.npz"
    profile = ["profile", str(folder), "-d", str(data), "--samples", str(args.samples), "--seq-len"]
    run_measured([*cli, *profile, str(args.seq_len), "--sequential", "-o", str(stats), "--force"])
    slot = args.inner * (args.inner + args.hidden) * 8
    runs = {
        "merge (no refit)": [],
        "merge --refit, all slots at once (--refit-memory 1TB)": ["--refit", "--refit-memory", "1TB"],
        f"merge --refit --refit-memory {slot} (one slot's sums)": ["--refit", "--refit-memory", str(slot)],
    }
    peaks, outs = [], []
    print(f"one slot's sums {slot / 1e6:.1f} MB, {args.keep} slots per layer {args.keep * slot / 1e6:.1f} MB")
    print("| run | wall s | peak RSS |")
    print("|---|---:|---:|")
    for label, flags in runs.items():
        out = work / f"{name}-merged-{len(outs)}"
        merge = ["merge", str(folder), "-s", str(stats), "-k", str(args.keep), "-o", str(out), "--force", *flags]
        wall, peak = run_measured([*cli, *merge])
        print(f"| {label} | {wall:.1f} | {peak / 1e9:.2f} GB |")
        peaks.append(peak)
        outs.append(out)
    base, whole, bounded = peaks
    print(f"peak RSS without / with the bound: {whole / bounded:.2f}x")
    print(f"the pass's extra over a plain merge without / with the bound: {(whole - base) / (bounded - base):.2f}x")
    a, b = down_projections(outs[1]), down_projections(outs[2])
    diff = max(float((a[k] - b[k]).abs().max() / a[k].abs().max()) for k in a)
    print(f"down projections, bounded vs unbounded: largest difference {diff:.3g} of the tensor's largest value")


if __name__ == "__main__":
    main()
