"""Peak memory of loading: `load_model` vs stock `from_pretrained`, and one decoder layer of `--sequential`.

    python -m benchmarks.load_memory                      # random Qwen3-MoE-style model, 4L h256 64E (145 MB f32)
    python -m benchmarks.load_memory --model /path/to/checkpoint --repeats 3

Each measurement runs in a fresh child process: it first loads a tiny model (imports, lazy
initialisation, allocator warm-up), then resets its resident high-water mark (`/proc/self/clear_refs`
5) and does the measured thing; the growth of the high-water mark over the resident memory before it
is that thing's cost. Printed as ratios against a baseline measured in the same run:
- whole model: `load_model` / `AutoModelForCausalLM.from_pretrained` (goal <= 1.0: no extra), and, for
  comparison, every layer read through the fused reader (the path `load_model` takes for FP8 checkpoints);
- one layer (`LayerwiseModel.load_layer` of the largest layer): peak growth / that layer's bytes, with
  the per-expert tensors read straight into the fused parameter (`runtime/fused.py`) and, as the
  baseline, through transformers' own stacking (the code before). Linux only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import machine

PROBE = """
import gc, json, sys
from pathlib import Path
import torch

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

what, small, model = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

def load(folder):
    if what == "load_model":
        from moe_prune.runtime.loading import load_model
        return load_model(folder, "float32"), None
    if what == "from_pretrained":
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), None
    if what == "layerwise_whole":  # every layer through the fused reader (load_model's quantized fallback)
        from moe_prune.checkpoint.source import Checkpoint
        from moe_prune.runtime.loading import _load_dequantized_layerwise
        return _load_dequantized_layerwise(Checkpoint.open(folder), "float32", "cpu", False), None
    from moe_prune.runtime import fused
    from moe_prune.runtime.sequential import LayerwiseModel
    if what == "layer_stacking":  # the code before: every tensor through transformers' conversion
        fused.split = lambda stored, *rest: ({}, list(stored))
    runtime = LayerwiseModel(folder, "model.layers", "float32", "cpu", False)
    index = len(runtime.layers) - 1
    layer = runtime.load_layer(index)
    return runtime, sum(p.numel() * p.element_size() for p in layer.parameters())

kept = load(small)
del kept
gc.collect()
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
loaded, layer = load(model)
print(json.dumps({"growth": status("VmHWM:") - before, "layer": layer}))
"""


def build(folder: Path, **overrides: int) -> Path:
    """A random qwen3_moe checkpoint (float32), reused when already there."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    fields = {
        "vocab_size": 2048,
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "num_experts": 64,
        "num_experts_per_tok": 8,
    }
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**{**fields, **overrides}), dtype=torch.float32)
    model.save_pretrained(folder)
    return folder


def measure(what: str, small: Path, model: Path) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, what, str(small), str(model)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"probe {what} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="qwen3_moe-style checkpoint (default: random)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each probe; the smallest growth is kept")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "moe-prune-bench")
    args = parser.parse_args()
    if not Path("/proc/self/clear_refs").exists():
        raise SystemExit("needs Linux /proc/self/clear_refs")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    small = build(args.work_dir / "load-small", hidden_size=64, num_experts=8, moe_intermediate_size=64)
    model = args.model or build(args.work_dir / "load-qwen3moe-64e")
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    print(f"machine: {machine()}")
    print(f"model {model} ({size / 2**20:.0f} MiB on disk)")
    best = {
        what: min((measure(what, small, model) for _ in range(args.repeats)), key=lambda r: r["growth"])
        for what in ("from_pretrained", "load_model", "layerwise_whole", "layer_stacking", "layer_fused")
    }
    mib = {what: r["growth"] / 2**20 for what, r in best.items()}
    print(f"whole model: from_pretrained +{mib['from_pretrained']:.0f} MiB, load_model +{mib['load_model']:.0f} MiB")
    base = best["from_pretrained"]["growth"]
    print(f"  load_model / from_pretrained: {best['load_model']['growth'] / base:.3f}")
    whole = mib["layerwise_whole"]
    print(f"  every layer through the fused reader: +{whole:.0f} MiB, {whole / mib['from_pretrained']:.3f}x")
    print(f"  model bytes on disk / from_pretrained's growth: {size / base:.3f}")
    layer = best["layer_fused"]["layer"]
    print(f"one decoder layer ({layer / 2**20:.0f} MiB), peak growth of load_layer:")
    for what in ("layer_stacking", "layer_fused"):
        print(f"  {what:15s} +{mib[what]:.0f} MiB = {best[what]['growth'] / layer:.2f} layers")


if __name__ == "__main__":
    main()
