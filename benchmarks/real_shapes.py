"""Real-shape rehearsal: every stage on a random checkpoint with a released model's per-layer shapes.

    python -m benchmarks.real_shapes --preset qwen3-30b-a3b --layers 2
    python -m benchmarks.real_shapes --preset deepseek-v3-fp8 --layers 2 --memory-budget 20GB
    python -m benchmarks.real_shapes --preset deepseek-v3-fp8 --layers 1 --only "profile --sequential" \
        --expert-memory 4GB    # a MoE layer's experts (22.5 GB in bf16) a chunk at a time

The checkpoint has exactly the preset's per-layer tensor names, shapes, dtypes and quantization (FP8
128x128 blocks with float32 scale_inv, MXFP4 blocks/scales) and its real vocabulary, but N decoder
layers: names and shapes come from transformers' own model class built on the meta device and turned
into the on-disk layout by transformers' `revert_weight_conversion` (what `save_pretrained` writes);
random values are generated and written one shard at a time (`checkpoint_writer`), so the model is never
held. Then each stage runs as its own process: wall time, peak RSS (wait4's rusage of that process alone,
polled so that a stage over `--memory-budget` is stopped instead of taking the shared machine down),
peak RSS / one decoder layer's bytes in the working dtype, bytes written, and the projection to the full
model (per-layer time x its layers; peak memory of the layer-at-a-time stages does not grow with layers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.checkpoint_writer import layer_bytes
from benchmarks.common import machine, python
from benchmarks.profile_memory import with_tokenizer, write_data
from benchmarks.real_presets import PRESETS, Preset
from moe_prune.sizes import parse_size

GiB = 2**30


@dataclass
class StageResult:
    name: str
    wall: float
    peak: int
    written: int
    status: str  # ok, or the first line of the failure


def run_stage(cmd: list[str], budget: int, log: Path) -> tuple[float, int, str]:
    """(wall s, peak RSS bytes, status) of one command; killed when its resident memory passes `budget`."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        status = "ok"
        while True:
            pid, code, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if _resident(proc.pid) > budget:
                os.kill(proc.pid, signal.SIGKILL)
                status = f"stopped: resident memory passed the {budget / GiB:.1f} GiB budget"
            time.sleep(0.05)
    wall = time.perf_counter() - start
    if status == "ok" and code != 0:
        lines = [x for x in log.read_text().splitlines() if x.strip()]
        status = "failed: " + (lines[-1][:160] if lines else f"exit status {code}")
    return wall, usage.ru_maxrss * 1024, status


def _resident(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def stages(preset: Preset, model: Path, data: Path, work: Path, args: argparse.Namespace) -> list[tuple]:
    """(name, argv after `moe-prune`, output path, what it scales with) of every stage, in order."""
    keep = str(preset.config_value("experts") // 2)
    window = ["--samples", str(args.samples), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
    common = ["--data", str(data), *window, "--dtype", args.dtype, "--force"]
    seq_stats = work / "stats-seq.npz"
    whole = args.only is None or any("profile".startswith(o) for o in args.only)
    stats = work / "stats.npz" if whole else seq_stats  # score and merge read the profile that runs
    chunked = ["--expert-memory", args.expert_memory]
    tokens = ["--max-tokens", str(args.samples * args.seq_len), "--dtype", args.dtype]
    evaluation = [str(model), "--data", str(data), *window[2:], *tokens]  # eval has no --samples

    def merge(name: str, folder: str, *options: str) -> tuple[str, list[str], Path]:
        argv = ["merge", str(model), "--stats", str(stats), "--keep", keep, *options, "--out", str(work / folder)]
        return name, [*argv, "--force"], work / folder

    return [
        ("profile", ["profile", str(model), "--out", str(stats), *common], stats),
        ("profile --sequential", ["profile", str(model), "--out", str(seq_stats), *common, "--sequential"], seq_stats),
        (
            "profile --for reap --sequential",
            ["profile", str(model), "--out", str(work / "reap.npz"), *common, "--sequential", "--for", "reap"],
            work / "reap.npz",
        ),
        (
            "profile --sequential --expert-memory",  # a layer's experts a chunk at a time (runtime.expert_chunks)
            ["profile", str(model), "--out", str(seq_stats), *common, "--sequential", *chunked],
            seq_stats,
        ),
        (
            "score reap 50%",
            [
                "score",
                str(stats),
                "--criterion",
                "reap",
                "--ratio",
                "0.5",
                "--model",
                str(model),
                "--out",
                str(work / "mask.json"),
                "--force",
            ],
            work / "mask.json",
        ),
        (
            "prune 50%",
            ["prune", str(model), "--mask", str(work / "mask.json"), "--out", str(work / "pruned"), "--force"],
            work / "pruned",
        ),
        merge("merge uncurl 50%", "merged"),
        merge("merge frequency 50%", "merged-f", "--method", "frequency"),
        # the sums in groups of at most 256 MB: the layer runs once per group
        merge("merge uncurl --refit 50% --refit-memory 256MB", "merged-rb", "--refit", "--refit-memory", "256MB"),
        merge(  # DeepSeek-V3: no whole layer held
            "merge uncurl --refit 50% --expert-memory --refit-memory",
            "merged-rc",
            *["--refit", *chunked, "--refit-memory", args.refit_memory],
        ),
        # without --refit-stats sums: one layer-by-layer pass over the profile's windows
        merge("merge uncurl --refit 50%", "merged-r", "--refit"),
        ("eval", ["eval", *evaluation], None),
        ("eval --sequential", ["eval", *evaluation, "--sequential"], None),
        ("eval --sequential --expert-memory", ["eval", *evaluation, "--sequential", *chunked], None),
        (
            "finetune 1 step (router)",
            [
                "finetune",
                str(work / "pruned"),
                "--data",
                str(data),
                "--tokens",
                str(args.batch_size * args.seq_len),
                "--seq-len",
                str(args.seq_len),
                "--batch-size",
                str(args.batch_size),
                "--train",
                "router",
                "--eval-tokens",
                "0",
                "--out",
                str(work / "finetuned"),
                "--force",
            ],
            work / "finetuned",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers built (MoE layers for DeepSeek-V3)")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16", help="working dtype of profile and eval")
    parser.add_argument("--memory-budget", default="12GB", help="stop a stage whose resident memory passes this")
    parser.add_argument("--expert-memory", default="4GB", help="of the --expert-memory stages")
    parser.add_argument("--refit-memory", default="4GB", help="of the --expert-memory refit stage")
    only = "run only these stages: a full stage name, or the start of names"
    parser.add_argument("--only", nargs="*", default=None, help=only)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "moe-prune-real-shapes")
    parser.add_argument("--keep-files", action="store_true", help="keep the checkpoint and outputs")
    parser.add_argument(
        "--drop-outputs", action="store_true", help="delete each stage's written checkpoint once measured (disk)"
    )
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    budget = parse_size(args.memory_budget, "--memory-budget")
    work = args.work_dir / f"{args.preset}-{args.layers}"
    model = work / "model"
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    start = time.perf_counter()
    if not (model / "config.json").exists():
        subprocess.run(
            [python(), "-m", "benchmarks.checkpoint_writer", args.preset, str(args.layers), str(model)], check=True
        )
    built = time.perf_counter() - start
    with_tokenizer(model)
    data = work / "data.jsonl"
    write_data(data, 20 * args.samples * args.seq_len // 1000 + 10)
    config = json.loads((model / "config.json").read_text())
    moe_layers = preset.moe_layers(config)
    one_layer = layer_bytes(preset, model, args.dtype)
    print(
        f"{args.preset}: {config['num_hidden_layers']} decoder layers ({moe_layers} MoE) of {preset.full_layers}, "
        f"vocabulary {config['vocab_size']}, {folder_bytes(model) / 1e9:.2f} GB on disk (built in {built:.0f} s); "
        f"one MoE decoder layer {one_layer / GiB:.2f} GiB in {args.dtype}; {args.samples} x {args.seq_len} tokens"
    )
    results = []
    planned = stages(preset, model, data, work, args)
    names = {name for name, _, _ in planned}
    for name, argv, output in planned:
        if args.only is not None and not any(o == name or (o not in names and name.startswith(o)) for o in args.only):
            continue  # a stage's full name selects that stage alone, another string every stage it begins
        cmd = [python(), "-m", "moe_prune", *argv]
        wall, peak, status = run_stage(cmd, budget, work / f"{name.split()[0]}.log")
        results.append(StageResult(name, wall, peak, folder_bytes(output) if output else 0, status))
        _print_row(results[-1], moe_layers, preset.full_layers, one_layer)
        if args.drop_outputs and output is not None and output.is_dir() and output.name != "pruned":
            shutil.rmtree(output)  # finetune reads the pruned checkpoint
    print(
        json.dumps(
            {
                "preset": args.preset,
                "layers": moe_layers,
                "layer_bytes": one_layer,
                "stages": [vars(r) for r in results],
            }
        )
    )
    if not args.keep_files:
        shutil.rmtree(work, ignore_errors=True)


HEADER = f"{'stage':<32} {'wall s':>7} {'s/layer':>8} {'peak RSS':>9} {'/layer':>7} {'written':>9} {'full model':>11}"


def _print_row(r: StageResult, layers: int, full_layers: int, one_layer: int) -> None:
    if r.name == "profile":
        print(HEADER + "  status")
    per_layer = r.wall / layers
    print(
        f"{r.name:<32} {r.wall:7.1f} {per_layer:8.1f} {r.peak / GiB:7.2f}Gi {r.peak / one_layer:7.2f} "
        f"{r.written / 1e9:8.2f}G {per_layer * full_layers / 3600:9.2f} h  {r.status}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
