"""What `moe-prune eval` measures and how: perplexity on held-out text and lm-eval tasks, each model loaded
the same way; the held-out, task and model-loading groups are the ones `sweep` evaluates its models with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moe_prune.specs.fields import like, option
from moe_prune.specs.groups import Heldout, ModelLoading, Tasks
from moe_prune.specs.profile import ProfileSpec

BUFFER_MEMORY_HELP = "--sequential: hidden states kept in memory, e.g. 8GB; more spill to disk (a temporary file)."
ENGINE_HELP = (
    "transformers, or vllm: perplexity from vLLM's prompt log-probs on the same token windows and "
    "--tasks through lm-eval's vLLM backend (needs vLLM installed; no expert load)."
)


@dataclass(frozen=True)
class EvalSpec(ModelLoading, Tasks, Heldout):
    """One `eval` run: the model's (and a baseline's) perplexity, sizes and load, and task accuracy."""

    split: str = like(ProfileSpec, "split")
    baseline: str | None = option(None, "Also evaluate this model (e.g. the unpruned original) and compare.")
    log_samples: Path | None = option(
        None, "Write lm-eval's per-sample records (JSONL) to this file.", affects_result=False
    )
    perplexity: bool = option(True, "Also measure perplexity, sizes and expert load.", "--perplexity/--no-perplexity")
    force: bool = option(False, "Replace an existing --log-samples file.", "--force", affects_result=False)
    engine: str = option("transformers", ENGINE_HELP)
    sequential: bool = like(  # perplexity only: --tasks runs lm-eval on the whole model
        ProfileSpec, "sequential", help="Perplexity one decoder layer at a time: memory of one layer (not --tasks)."
    )
    buffer_memory: int | None = like(ProfileSpec, "buffer_memory", help=BUFFER_MEMORY_HELP)
    expert_memory: int | None = like(ProfileSpec, "expert_memory")
