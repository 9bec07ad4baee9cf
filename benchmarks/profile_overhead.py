"""`moe-prune profile` statistics vs a bare loop over the same tokens (targets: 1.15x; 1.05x --for one
criterion; 1.3x with gradients).

    python -m benchmarks.profile_overhead                   # demo model and a larger random MoE, CPU
    python -m benchmarks.profile_overhead --device cuda --dtype bfloat16
    python -m benchmarks.profile_overhead --models random --skip-gradients --cprofile

Forward: every forward statistic (router hooks, per-expert activation statistics, vocabulary
bitsets), and `--for` one criterion (FOR_CHOICES: the selection counts only, and REAP's one activation
field), against a bare `torch.inference_mode` forward of the same batches. The variants are timed in
turn, round after round, and each keeps its fastest round: a busy machine slows all of them alike.
Gradients: the profile's forward+backward of the summed next-token loss with the recorder and the
expert gradients only, against the same forward+backward with no recorder. `--cprofile` prints
where the full profile's time goes (cProfile, sorted by own time).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import add_model_options, machine, resolve_model
from moe_prune.architectures.config import ModelConfig
from moe_prune.runtime import gradients as grad_stats
from moe_prune.runtime.loading import load_model
from moe_prune.stages.profile import Settings, _collect

FOR_CHOICES = ("usage-frequency", "reap")  # profile --for: selection counts only; one activation statistic


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: this process's CPU seconds (shared hosts)
clock = CLOCKS["wall"]


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Fastest time of each function over `repeats` rounds that call every function once, in turn."""
    for fn in fns.values():
        fn()  # warm-up: allocator, kernels
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = clock()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best[name] = min(best[name], clock() - start)
    return best


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
    fns: dict[str, Callable[[], object]] = {"bare": bare}
    fns["profile"] = lambda: _collect(model, config, windows, forward, None)
    for name in args.for_choices:
        only = Settings(batch_size=args.batch_size, device=args.device, dtype=args.dtype, for_names=(name,))
        fns[f"for {name}"] = lambda only=only: _collect(model, config, windows, only, None)
    times = interleaved(fns, args.repeats)
    if args.cprofile:
        profiler = cProfile.Profile()
        profiler.runcall(fns["profile"])
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.cprofile)
    if args.skip_gradients:
        return times
    backward = Settings(batch_size=args.batch_size, device=args.device, dtype=args.dtype, gradients=True)
    times |= interleaved(
        {"bare_bwd": bare_backward, "profile_bwd": lambda: _collect(model, config, windows, backward, None)},
        args.repeats,
    )
    times["reduce"] = min(bare_backward(reduce=True) for _ in range(args.repeats))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser, sequences=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-gradients", action="store_true", help="forward statistics only")
    parser.add_argument("--for-choices", nargs="*", default=list(FOR_CHOICES), help="profile --for variants timed")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N", help="print the N costliest functions")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="cpu: process CPU time (a busy shared machine)"
    )
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    print(f"machine: {machine()}; device {args.device}, {args.dtype}")
    print(
        f"{args.sequences} sequences x {args.seq_len} tokens, batch {args.batch_size}, "
        f"best of {args.repeats}, {args.clock} clock"
    )
    fors = "".join(f"  {'--for ' + n:>22} {'ratio':>6}" for n in args.for_choices)
    header = f"{'model':<26} {'bare s':>7} {'stats s':>8} {'ratio':>6}{fors}"
    if not args.skip_gradients:
        header += f"  {'fwd+bwd s':>9} {'+stats s':>8} {'ratio':>6}  {'reduce s':>8} {'ratio w/o':>9}"
    print(header + "  (targets <= 1.15; --for <= 1.05; gradients <= 1.30)")
    for name in args.models:
        name, folder = resolve_model(name, args.work_dir)
        t = measure(folder, args)
        row = f"{name:<26} {t['bare']:7.3f} {t['profile']:8.3f} {t['profile'] / t['bare']:6.3f}"
        row += "".join(f"  {t['for ' + n]:22.3f} {t['for ' + n] / t['bare']:6.3f}" for n in args.for_choices)
        if not args.skip_gradients:
            row += (
                f"  {t['bare_bwd']:9.3f} {t['profile_bwd']:8.3f} {t['profile_bwd'] / t['bare_bwd']:6.3f}  "
                f"{t['reduce']:8.3f} {(t['profile_bwd'] - t['reduce']) / t['bare_bwd']:9.3f}"
            )
        print(row)


if __name__ == "__main__":
    main()
