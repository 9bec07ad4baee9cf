"""End to end against llm-compressor's REAP: the same model, the same token windows, in one run.

    python -m benchmarks.llmc_reap --preset qwen3-30b-a3b --layers 2 --llmc-python /path/to/venv/bin/python
    python -m benchmarks.llmc_reap --checkpoint /path/to/model --llmc-python ...   # any checkpoint both load

llm-compressor (0.14 pins transformers <= 5.17) lives in its own environment: its Python comes from
`--llmc-python` or MOE_PRUNE_LLMC_PYTHON and runs `benchmarks/llmc_oneshot.py` (its `oneshot` with
`REAPPruningModifier(sparsity=0.5)`, writing the pruned checkpoint). moe-prune runs `profile --for reap` (whole
model and `--sequential`), `score -c reap --ratio 0.5` and `prune`. The calibration windows are the ones moe-prune's
profile counted, read back from its statistics (`stages.calibration.recorded_windows`, hash checked) and handed
to llm-compressor as token ids, so both see the very same tokens. Every stage is its own process, measured as
`benchmarks.real_shapes` measures its stages (wall time, peak RSS of that process, a memory budget), with
OMP_NUM_THREADS=1 on both sides. The checkpoint is read once before the first stage so that no stage pays the
cold read alone. Then per MoE layer: the experts each side dropped, and how far llm-compressor's saliency is from
moe-prune's REAP score (act_gate_norm_sum / hard_counts of the statistics, the formula of the paper).

llm-compressor runs twice: as shipped (`moe_calibrate_all_experts=False`, the setting its REAP log recommends;
otherwise its defaults), and with `--causal --no-propagate`: its traced calibration graph loses the causal mask,
so every token attends to the whole window (`llmc_oneshot.causal_masks` restores it), and it observes each
layer on the activations of the layers it already pruned; with both undone each layer is observed on the
unpruned model, as the paper's observer and moe-prune's profile do, both compute the same formula on the
same inputs, and should drop the same experts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine, python
from benchmarks.profile_memory import with_tokenizer, write_data
from benchmarks.real_presets import PRESETS
from benchmarks.real_shapes import GiB, folder_bytes, run_stage
from moe_prune.sizes import parse_size

LLMC_ENV = "MOE_PRUNE_LLMC_PYTHON"
ONESHOT = Path(__file__).with_name("llmc_oneshot.py")
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-30b-a3b")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the preset checkpoint")
    parser.add_argument("--checkpoint", type=Path, default=None, help="use this checkpoint instead of writing one")
    parser.add_argument("--llmc-python", default=os.environ.get(LLMC_ENV), help=f"default: ${LLMC_ENV}")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16", help="moe-prune's working dtype (llm-compressor: the model's)")
    parser.add_argument("--memory-budget", default="12GB", help="stop a stage whose resident memory passes this")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "moe-prune-llmc-reap")
    parser.add_argument("--keep-files", action="store_true", help="keep the checkpoint and outputs")
    args = parser.parse_args()
    if not args.llmc_python or not Path(args.llmc_python).exists():
        raise SystemExit(f"llm-compressor's Python not found: give --llmc-python or set {LLMC_ENV}")
    return args


def checkpoint(args: argparse.Namespace, work: Path) -> Path:
    """The given checkpoint, or the preset's random one (written once, as `benchmarks.real_shapes` writes it)."""
    if args.checkpoint is not None:
        return with_tokenizer(args.checkpoint)
    model = work / "model"
    if not (model / "config.json").exists():
        cmd = [python(), "-m", "benchmarks.checkpoint_writer", args.preset, str(args.layers), str(model)]
        subprocess.run(cmd, check=True)
    return with_tokenizer(model)


def read_once(model: Path) -> None:
    """Read every file of the checkpoint, so the page cache holds it for whichever stage comes first."""
    for path in sorted(model.iterdir()):
        with path.open("rb") as handle:
            while handle.read(1 << 24):
                pass


def export_windows(model: Path, stats: Path, out: Path) -> str:
    """Write the windows profile counted (JSON token ids) for llm-compressor; their hash."""
    from moe_prune.artifacts.provenance import hash_tokens
    from moe_prune.artifacts.stats import Stats
    from moe_prune.checkpoint.source import Checkpoint
    from moe_prune.stages.calibration import recorded_windows

    windows, _ = recorded_windows(Checkpoint.open(model), Stats.load(stats), stats.name, False)
    out.write_text(json.dumps(windows.tolist()))
    return hash_tokens(windows)


def moe_prune_stages(model: Path, data: Path, work: Path, args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(name, command) of moe-prune's stages, in order; the first writes the statistics the windows come from."""
    window = ["--samples", str(args.samples), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
    common = ["--data", str(data), *window, "--dtype", args.dtype, "--for", "reap", "--force"]
    cli = [python(), "-m", "moe_prune"]
    stats, mask = work / "reap.npz", work / "mask.json"
    score = ["score", str(stats), "-c", "reap", "--ratio", "0.5", "--model", str(model), "--out", str(mask)]
    return [
        ("moe-prune profile --for reap", [*cli, "profile", str(model), "--out", str(stats), *common]),
        (
            "moe-prune profile --for reap --seq",
            [*cli, "profile", str(model), "--out", str(work / "seq.npz"), *common, "--sequential"],
        ),
        ("moe-prune score -c reap --ratio 0.5", [*cli, *score, "--force"]),
        ("moe-prune prune", [*cli, "prune", str(model), "--mask", str(mask), "--out", str(work / "pruned"), "--force"]),
    ]


def llmc_runs(model: Path, windows: Path, work: Path, args: argparse.Namespace) -> list[tuple[str, list[str], Path]]:
    """(name, command, report) of llm-compressor's runs: as shipped, then with the causal mask restored."""
    runs = []
    variants = (
        ("llm-compressor REAP", []),
        ("llm-compressor REAP --causal --no-prop", ["--causal", "--no-propagate"]),
    )
    for name, extra in variants:
        tag = "llmc" + "".join(extra).replace("-", "_")
        report = work / f"{tag}.json"
        cmd = [args.llmc_python, str(ONESHOT), str(model), str(windows), str(work / tag), str(report)]
        runs.append((name, [*cmd, "--sparsity", "0.5", "--batch-size", str(args.batch_size), *extra], report))
    return runs


def moe_prune_drops(work: Path) -> tuple[list[set[int]], list[np.ndarray]]:
    """Per MoE layer: the experts moe-prune's mask drops, and the REAP score of its statistics."""
    from moe_prune.artifacts.stats import Stats

    layers = json.loads((work / "mask.json").read_text())["layers"]
    drops = [set(layers[key]["drop"]) for key in sorted(layers, key=int)]
    arrays = Stats.load(work / "reap.npz").arrays
    counts = arrays["hard_counts"].astype(np.float64)
    scores = arrays["act_gate_norm_sum"] / np.maximum(counts, 1.0)
    return drops, list(scores)


def llmc_drops(report: Path) -> tuple[list[set[int]], list[np.ndarray]]:
    """Per MoE layer: the experts llm-compressor dropped, and its saliency."""
    data = json.loads(report.read_text())
    order = sorted(data["retained"], key=lambda name: [int(p) if p.isdigit() else p for p in name.split(".")])
    saliency = [np.asarray(s, dtype=np.float64) for s in data["saliency"]]
    drops = [set(range(len(saliency[i]))) - set(data["retained"][name]) for i, name in enumerate(order)]
    return drops, saliency


def agreement(ours: tuple, theirs: tuple, name: str) -> None:
    """One line per layer: experts dropped by one side only, and the saliency's largest relative difference."""
    for layer, (a, b, sa, sb) in enumerate(zip(ours[0], theirs[0], ours[1], theirs[1], strict=True)):
        rel = np.max(np.abs(sa - sb)) / np.max(np.abs(sa))
        order = np.argsort(sa)
        gap = np.min(np.diff(sa[order])) / np.max(np.abs(sa))
        print(
            f"  {name}, MoE layer {layer}: {len(a)} dropped each, {'same set' if a == b else 'differ'} "
            f"({len(a - b)} only moe-prune, {len(b - a)} only llm-compressor); saliency differs by {rel:.1e} "
            f"(closest two scores {gap:.1e}; both of the layer's largest score)"
        )


def row(name: str, wall: float, peak: int, status: str) -> None:
    print(f"{name:<38} {wall:8.1f} {peak / GiB:8.2f}Gi  {status}", flush=True)


def summary(results: dict[str, tuple[float, int, str]]) -> None:
    """moe-prune's pipelines (whole-model or sequential profile, then score and prune) against llm-compressor."""
    base_wall, base_peak, _ = results["llm-compressor REAP"]
    tail = ("moe-prune score -c reap --ratio 0.5", "moe-prune prune")
    for label, first in (
        ("whole-model", "moe-prune profile --for reap"),
        ("--sequential", "moe-prune profile --for reap --seq"),
    ):
        parts = [results[first], *(results[t] for t in tail)]
        wall, peak = sum(p[0] for p in parts), max(p[1] for p in parts)
        print(
            f"moe-prune ({label} profile + score + prune): {wall:.1f} s, peak {peak / GiB:.2f} GiB; "
            f"/ llm-compressor: wall {wall / base_wall:.2f}x, peak RSS {peak / base_peak:.2f}x"
        )


def header(args: argparse.Namespace, model: Path, built: float) -> None:
    """What ran: the machine, both sides' versions, the model and the windows."""
    query = "from importlib.metadata import version as v; print(v('llmcompressor'), v('transformers'), v('torch'))"
    theirs = subprocess.run([args.llmc_python, "-c", query], capture_output=True, text=True, check=True).stdout.split()
    print(f"machine: {machine()} (this process); every stage runs with OMP_NUM_THREADS=1")
    print(f"llm-compressor {theirs[0]} (transformers {theirs[1]}, torch {theirs[2]})")
    print(
        f"model {model}: {folder_bytes(model) / 1e9:.2f} GB on disk (built in {built:.0f} s); "
        f"{args.samples} x {args.seq_len} tokens, batch {args.batch_size}, 50% of experts per layer"
    )


def main() -> None:
    args = options()
    os.environ.update(THREADS)  # both sides' children: one thread each
    work = args.work_dir / (args.checkpoint.name if args.checkpoint else f"{args.preset}-{args.layers}")
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = checkpoint(args, work)
    built = time.perf_counter() - start
    data = work / "data.jsonl"
    write_data(data, 20 * args.samples * args.seq_len // 1000 + 10)
    budget = parse_size(args.memory_budget, "--memory-budget")
    header(args, model, built)
    read_once(model)
    print(f"{'stage':<38} {'wall s':>8} {'peak RSS':>10}  status")
    results: dict[str, tuple[float, int, str]] = {}
    for index, (name, cmd) in enumerate(moe_prune_stages(model, data, work, args)):
        results[name] = run_stage(cmd, budget, work / f"stage{index}.log")
        row(name, *results[name])
        if index == 0:
            if results[name][2] != "ok":
                raise SystemExit(f"the first profile failed, no windows to share: {work / 'stage0.log'}")
            digest = export_windows(model, work / "reap.npz", work / "windows.json")
    reports = {}
    for index, (name, cmd, report) in enumerate(llmc_runs(model, work / "windows.json", work, args)):
        results[name] = run_stage(cmd, budget, work / f"llmc{index}.log")
        row(name, *results[name])
        reports[name] = report
    print(f"windows: {args.samples} x {args.seq_len} token ids, {digest}, the same for both")
    if all(status == "ok" for _, _, status in results.values()):
        summary(results)
        ours = moe_prune_drops(work)
        for name, report in reports.items():
            agreement(ours, llmc_drops(report), name)
    print(json.dumps({"windows": digest, "stages": {k: list(v) for k, v in results.items()}}))
    if not args.keep_files:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
