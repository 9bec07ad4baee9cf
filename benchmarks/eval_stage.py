"""`eval`'s perplexity through `stages.evaluate.run`, for stages the CLI does not offer yet (`--sequential`).

    python -m benchmarks.eval_stage MODEL --data FILE --seq-len 256 --batch-size 4 --max-tokens 2048 --sequential

Used by `benchmarks.real_shapes` to measure `eval --sequential`'s peak memory as its own process.
"""

from __future__ import annotations

import argparse

from moe_prune.stages import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", required=True)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sequential", action="store_true")
    args = parser.parse_args()
    result = evaluate.run(
        args.model,
        args.data,
        args.seq_len,
        args.batch_size,
        args.max_tokens,
        dtype=args.dtype,
        device=args.device,
        sequential=args.sequential,
    ).model
    print(f"perplexity {result.perplexity:.6f} over {result.tokens_scored} tokens")


if __name__ == "__main__":
    main()
