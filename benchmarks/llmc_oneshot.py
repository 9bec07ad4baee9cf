"""llm-compressor's REAP through its own `oneshot`, on given token windows: the baseline of `benchmarks.llmc_reap`.

    /path/to/llmc-venv/bin/python benchmarks/llmc_oneshot.py MODEL WINDOWS.json OUT REPORT.json \
        [--sparsity 0.5] [--batch-size 4] [--calibrate-all-experts] [--no-propagate]

Runs under llm-compressor's Python (its own environment: llmcompressor 0.14 pins transformers <= 5.17),
so it imports nothing from moe_prune. The model is loaded with transformers' `from_pretrained` and `oneshot`
linearizes its experts after loading (its fallback; `load_quantizable_moe`, which would load per-expert
checkpoints straight into its 2-D experts, fails under transformers 5.17 without torchvision: its patch mapping
imports every model module, image processors included, and PyPI has no torchvision for the CPU torch), then
`oneshot(recipe=REAPPruningModifier(sparsity))` on the windows as a tokenized dataset (token ids, no text,
in the given order), and saved to OUT. REPORT gets, per MoE layer, the experts it kept and the saliency
vector it chose them by (read off its `REAPSaliencyTracker.compute_retained_experts`, the one place the
scores exist; the wrapper only records its argument and result).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def causal_masks(model: object) -> None:
    """Make the traced graph's `create_causal_mask` build the eager (additive, causal) mask calibration runs with.

    llm-compressor 0.14's sequential pipeline traces the model with torch.fx; the traced first subgraph calls
    `create_causal_mask` with a config rebuilt from its dict (`_attn_implementation` lost, so sdpa), which returns
    None for an all-ones attention mask (sdpa would then attend causally by itself), while calibration forces
    eager attention, which adds no mask when given None: every token attends to the whole window. Forcing eager
    in the mask call restores the causal mask; the model's module global is what its forward (and the trace) calls.
    """
    import functools
    import sys

    module = sys.modules[type(model).__module__]
    real = module.create_causal_mask

    @functools.wraps(real)
    def eager_mask(config: object, *args: object, **kwargs: object) -> object:
        config._attn_implementation = "eager"  # type: ignore[attr-defined]
        return real(config, *args, **kwargs)

    module.create_causal_mask = eager_mask


def record_saliency() -> list[list[float]]:
    """The list each layer's saliency vector is appended to when REAP chooses that layer's experts by it."""
    from llmcompressor.modifiers.pruning.reap.utils import REAPSaliencyTracker

    saliencies: list[list[float]] = []
    choose = REAPSaliencyTracker.compute_retained_experts

    def recording(self: REAPSaliencyTracker, *args: object, **kwargs: object) -> object:
        saliencies.append(self.mean_saliency.tolist())
        return choose(self, *args, **kwargs)

    REAPSaliencyTracker.compute_retained_experts = recording  # type: ignore[method-assign]
    return saliencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("windows", type=Path, help="JSON list of equal-length token id lists")
    parser.add_argument("out", type=Path)
    parser.add_argument("report", type=Path)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--calibrate-all-experts", action="store_true", help="oneshot's default; REAP needs it not")
    parser.add_argument("--no-propagate", action="store_true", help="next layer sees the unpruned layer's output")
    parser.add_argument(
        "--causal", action="store_true", help="work around the non-causal calibration (see causal_masks)"
    )
    args = parser.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.reap import REAPPruningModifier
    from transformers import AutoModelForCausalLM

    saliencies = record_saliency()
    windows = json.loads(args.windows.read_text())
    data = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")  # oneshot linearizes the experts
    if args.causal:
        causal_masks(model)
    retained_path = args.report.with_suffix(".retained.json")
    oneshot(
        model=model,
        recipe=REAPPruningModifier(sparsity=args.sparsity, report_path=str(retained_path)),
        dataset=data,
        num_calibration_samples=len(windows),
        max_seq_length=len(windows[0]),
        batch_size=args.batch_size,
        shuffle_calibration_samples=False,
        moe_calibrate_all_experts=args.calibrate_all_experts,
        propagate_error=not args.no_propagate,
        output_dir=str(args.out),
    )
    retained = json.loads(retained_path.read_text())
    args.report.write_text(json.dumps({"retained": retained, "saliency": saliencies}))


if __name__ == "__main__":
    main()
