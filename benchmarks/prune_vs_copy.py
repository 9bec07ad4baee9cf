"""`moe-prune prune` at 50% drop vs a plain copy of the same checkpoint folder.

    python -m benchmarks.prune_vs_copy            # builds a ~2.1 GB, 3-shard random MoE once

Targets: wall time at most 1.0x the copy (prune writes half the expert bytes, copy writes all),
peak resident memory at most 1.5x the largest input shard. Both run as child processes so their
peak RSS is measured alone; each is run `--repeats` times and the fastest counts, so the page cache
is warm for both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.common import build_random_moe, machine, run_measured
from moe_prune.artifacts.mask import DropMask
from moe_prune.checkpoint.source import Checkpoint


def half_mask(folder: Path) -> DropMask:
    identity = Checkpoint.open(folder).identity
    keep = {layer: list(ids[: len(ids) // 2]) for layer, ids in identity.original_ids.items()}
    return DropMask.create(identity, keep, "benchmark: keep the first half")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "moe-prune-bench")
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    source = build_random_moe(args.work_dir / f"prune-src-{args.layers}l", args.layers, 1024, 2048, 16, 2)
    shards = sorted(source.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    total = sum(p.stat().st_size for p in shards)
    mask_path = args.work_dir / "half-mask.json"
    mask_path.write_text(half_mask(source).dumps())

    copy_dst, prune_dst = args.work_dir / "copy-out", args.work_dir / "prune-out"
    copy_cmd = [sys.executable, "-c", f"import shutil; shutil.copytree({str(source)!r}, {str(copy_dst)!r})"]
    prune_cmd = [sys.executable, "-m", "moe_prune", "prune", str(source), "--mask", str(mask_path)]
    prune_cmd += ["--out", str(prune_dst), "--max-shard-size", "1GB", "--json"]
    copies, prunes = [], []
    for _ in range(args.repeats):
        # Same conditions for both: no old output to delete, no dirty pages of the other's writes pending.
        for folder, cmd, times in ((copy_dst, copy_cmd, copies), (prune_dst, prune_cmd, prunes)):
            shutil.rmtree(folder, ignore_errors=True)
            os.sync()
            times.append(run_measured(cmd))
    copy_s, copy_rss = min(copies)
    prune_s, prune_rss = min(prunes)
    out_bytes = sum(p.stat().st_size for p in prune_dst.glob("*.safetensors"))
    print(f"machine: {machine()}")
    print(f"checkpoint: {total / 1e9:.2f} GB in {len(shards)} shards, largest {largest / 1e9:.2f} GB")
    print(f"plain copy:  {copy_s:7.2f} s  peak RSS {copy_rss / 1e6:8.1f} MB")
    print(f"prune 50%:   {prune_s:7.2f} s  peak RSS {prune_rss / 1e6:8.1f} MB  wrote {out_bytes / 1e9:.2f} GB")
    print(f"time ratio prune/copy: {prune_s / copy_s:.3f} (target <= 1.0)")
    print(f"peak RSS / largest shard: {prune_rss / largest:.3f} (target <= 1.5)")
    print(json.dumps({"prune_over_copy": prune_s / copy_s, "rss_over_shard": prune_rss / largest}))
    shutil.rmtree(copy_dst, ignore_errors=True)


if __name__ == "__main__":
    main()
