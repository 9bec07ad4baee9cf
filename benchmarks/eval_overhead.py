"""Perplexity loop of `moe-prune eval` vs a bare forward loop over the same tokens (target: at most 1.05x).

    python -m benchmarks.eval_overhead                      # demo model and a larger random MoE, CPU
    python -m benchmarks.eval_overhead --device cuda --dtype bfloat16

Both loops run the same model on the same batches; the eval loop adds the routing recorder's hooks,
the float32 cross-entropy and the host transfer of one scalar per batch.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.common import DEMO, best_of, build_random_moe, machine
from moe_prune.architectures.config import ModelConfig
from moe_prune.demo import DEMO_MODEL_DIR
from moe_prune.runtime.loading import load_model
from moe_prune.runtime.routing import RoutingRecorder
from moe_prune.stages.evaluate import nll_sum


def measure(folder: Path, dtype: str, device: str, sequences: int, seq_len: int, batch: int) -> tuple[float, float]:
    model = load_model(folder, dtype, device)
    config = ModelConfig.load(folder / "config.json")
    generator = torch.Generator().manual_seed(0)
    chunks = torch.randint(0, model.config.vocab_size, (sequences, seq_len), generator=generator)

    @torch.inference_mode()
    def bare() -> None:
        for start in range(0, sequences, batch):
            model(input_ids=chunks[start : start + batch].to(model.device), use_cache=False)

    def evaluate() -> None:
        with RoutingRecorder(model, config):
            nll_sum(model, chunks, batch, lambda done: None)

    evaluate()  # warm-up: allocator, kernels
    return best_of(bare), best_of(evaluate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[DEMO, "random"], help="demo, random, or checkpoint folders")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "moe-prune-bench")
    args = parser.parse_args()
    print(f"machine: {machine()}; device {args.device}, {args.dtype}")
    print(f"{'model':<28} {'bare s':>8} {'eval s':>8} {'ratio':>7}  (target <= 1.05)")
    for name in args.models:
        if name == DEMO:
            folder = DEMO_MODEL_DIR
        elif name == "random":
            name = "random 8L h1024 64E top8"
            folder = build_random_moe(args.work_dir / "random-64e", 8, 1024, 512, 64, 8, dtype=torch.float32)
        else:
            folder = Path(name)
        bare, evaluated = measure(folder, args.dtype, args.device, args.sequences, args.seq_len, args.batch_size)
        print(f"{name:<28} {bare:8.3f} {evaluated:8.3f} {evaluated / bare:7.3f}")


if __name__ == "__main__":
    main()
