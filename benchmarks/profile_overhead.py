"""`moe-prune profile` statistics vs a bare loop over the same tokens (targets: 1.15x, 1.3x with gradients).

    python -m benchmarks.profile_overhead                   # demo model and a larger random MoE, CPU
    python -m benchmarks.profile_overhead --device cuda --dtype bfloat16

Forward: every forward statistic (router hooks, per-expert activation statistics, vocabulary
bitsets) against a bare `torch.inference_mode` forward of the same batches. Gradients: the
profile's forward+backward of the summed next-token loss with the recorder and the expert
gradients only, against the same forward+backward with no recorder.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.common import add_model_options, best_of, machine, resolve_model
from moe_prune.architectures.config import ModelConfig
from moe_prune.runtime import gradients as grad_stats
from moe_prune.runtime.loading import load_model
from moe_prune.stages.profile import Settings, _collect


def measure(folder: Path, args: argparse.Namespace) -> dict[str, float]:
    model = load_model(folder, args.dtype, args.device)
    config = ModelConfig.load(folder / "config.json")
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(0, model.config.vocab_size, (args.sequences, args.seq_len), generator=generator)
    batches = [windows[s : s + args.batch_size].to(model.device) for s in range(0, args.sequences, args.batch_size)]

    @torch.inference_mode()
    def bare() -> None:
        for batch in batches:
            model(input_ids=batch, use_cache=False)

    def bare_backward(reduce: bool = False) -> float:
        """Forward+backward over the batches; with `reduce`, the seconds of the once-per-run gradient reduction."""
        with grad_stats.expert_gradients(model, config) as layers:
            for batch in batches:
                logits = model(input_ids=batch, use_cache=False).logits
                targets = batch[:, 1:].reshape(-1)
                predicted = logits[:, :-1].reshape(targets.numel(), -1).float()
                torch.nn.functional.cross_entropy(predicted, targets, reduction="sum").backward()
            if not reduce:
                return 0.0
            start = time.perf_counter()
            hidden = model.config.get_text_config().hidden_size
            grad_stats.reduce(layers, config.num_experts, hidden, windows[:, 1:].numel())
            return time.perf_counter() - start

    forward = Settings(batch_size=args.batch_size, device=args.device, dtype=args.dtype)
    backward = Settings(batch_size=args.batch_size, device=args.device, dtype=args.dtype, gradients=True)
    times = {}
    for name, fn in (
        ("bare", bare),
        ("profile", lambda: _collect(model, config, windows, forward, None)),
        ("bare_bwd", bare_backward),
        ("profile_bwd", lambda: _collect(model, config, windows, backward, None)),
    ):
        fn()  # warm-up: allocator, kernels
        times[name] = best_of(fn, args.repeats)
    times["reduce"] = min(bare_backward(reduce=True) for _ in range(args.repeats))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser, sequences=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}; device {args.device}, {args.dtype}")
    print(f"{args.sequences} sequences x {args.seq_len} tokens, batch {args.batch_size}, best of {args.repeats}")
    header = f"{'model':<26} {'bare s':>7} {'stats s':>8} {'ratio':>6}  {'fwd+bwd s':>9} {'+stats s':>8} {'ratio':>6}"
    print(header + f"  {'reduce s':>8} {'ratio w/o':>9}  (targets <= 1.15, <= 1.30)")
    for name in args.models:
        name, folder = resolve_model(name, args.work_dir)
        t = measure(folder, args)
        print(
            f"{name:<26} {t['bare']:7.3f} {t['profile']:8.3f} {t['profile'] / t['bare']:6.3f}  "
            f"{t['bare_bwd']:9.3f} {t['profile_bwd']:8.3f} {t['profile_bwd'] / t['bare_bwd']:6.3f}  "
            f"{t['reduce']:8.3f} {(t['profile_bwd'] - t['reduce']) / t['bare_bwd']:9.3f}"
        )


if __name__ == "__main__":
    main()
