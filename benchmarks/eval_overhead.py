"""Perplexity loop of `moe-prune eval` vs a bare forward loop over the same tokens (target: at most 1.05x).

    python -m benchmarks.eval_overhead                      # demo model and a larger random MoE, CPU
    python -m benchmarks.eval_overhead --device cuda --dtype bfloat16

Both loops run the same model on the same batches; the eval loop adds the routing recorder's hooks,
the float32 cross-entropy and the host transfer of one scalar per batch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.common import add_model_options, best_of, machine, resolve_model
from moe_prune.architectures.config import ModelConfig
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
    add_model_options(parser, sequences=16)
    args = parser.parse_args()
    print(f"machine: {machine()}; device {args.device}, {args.dtype}")
    print(f"{'model':<28} {'bare s':>8} {'eval s':>8} {'ratio':>7}  (target <= 1.05)")
    for name in args.models:
        name, folder = resolve_model(name, args.work_dir)
        bare, evaluated = measure(folder, args.dtype, args.device, args.sequences, args.seq_len, args.batch_size)
        print(f"{name:<28} {bare:8.3f} {evaluated:8.3f} {evaluated / bare:7.3f}")


if __name__ == "__main__":
    main()
