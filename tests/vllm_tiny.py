"""Tiny random ragged checkpoints of the families moe-prune's vLLM plugin serves (tests/test_vllm_serving.py).

One row per family in TINY_RAGGED: config overrides (vLLM's CPU attention has no head under 32), the experts each
MoE layer keeps (a layer under top-k where the family allows it), the dtype, and where vLLM's own class already
differs from transformers on the unpruned model, the tolerance that gap needs (measured, in the row's comment).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from moe_prune.artifacts.mask import DropMask
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.stages import prune

# Experts kept (original ids) in the MoE layers, cycling: the first layer keeps fewer than top-k (2).
UNDER_TOP_K = ([6], [0, 2, 3, 5, 7], [1, 4])
# For families whose vLLM class needs two experts per layer (checkpoint/serving.py min_experts, or vLLM's grouped
# top-k, which sums each group's best two): with top-k 3 the first layer is still under top-k.
TWO_OR_MORE = ([6, 1], [0, 2, 3, 5, 7], [1, 4, 5])
TOP_K_3 = {"num_experts_per_tok": 3}
# MLA families (DeepSeek, GLM-4-MoE-Lite): query/key heads of 24 + 8 and value heads of 32, served with MLA off
# (VLLM_MLA_DISABLE, tests/test_vllm_serving.py run_script: vLLM CPU's MLA takes bfloat16 only) by its attention
MLA_HEADS = {"qk_nope_head_dim": 24, "qk_rope_head_dim": 8, "v_head_dim": 32, "kv_lora_rank": 32, "q_lora_rank": 32}
# DeepSeek routing as transformers' classes run it, in the keys vLLM's class reads and only the hub's config.json
# carries; one group (tests/tiny_models.py's two would need as many experts kept in each)
DEEPSEEK_V2 = {**MLA_HEADS, "n_group": 1, "topk_group": 1, "topk_method": "greedy"}
DEEPSEEK_V3 = {**MLA_HEADS, "n_group": 1, "topk_group": 1, "topk_method": "noaux_tc", "scoring_func": "sigmoid"}


class Tiny(NamedTuple):
    """A tiny random family served ragged: config overrides (heads of 32 or more: vLLM's CPU attention has no
    smaller head; tests/tiny_models.py uses 8), experts kept, and the dtype vLLM's CPU kernels take for it."""

    overrides: dict
    keep: tuple = UNDER_TOP_K
    dtype: str = "float32"
    bias: float = 0.5  # spread of the routers' expert-selection biases (e_score_correction_bias), if any
    # (relative perplexity, log-prob) differences allowed where vLLM's own class differs as much on the unpruned model
    tolerance: tuple[float, float] | None = None


AFMOE_HUB_KEYS = {"score_func": "sigmoid", "route_norm": True, "n_group": 1, "topk_group": 1}
TINY_RAGGED = {
    "qwen3_moe": Tiny({"head_dim": 32}),
    "qwen2_moe": Tiny({"hidden_size": 128}),
    "olmoe": Tiny({"hidden_size": 128}),
    "llama4_text": Tiny({"head_dim": 32}),  # top-1, as Llama 4 itself
    "granitemoe": Tiny({"hidden_size": 128}),
    "glm4_moe": Tiny({"head_dim": 32, **TOP_K_3}, TWO_OR_MORE),
    "granitemoeshared": Tiny({"hidden_size": 128}),
    "granitemoe_swa": Tiny({"hidden_size": 128}),
    "exaone_moe": Tiny({"hidden_size": 128}, TWO_OR_MORE),  # transformers' grouped top-k needs two per layer
    # vLLM CPU's router drops the softmax routers' selection bias (ERNIE's moe_statics), stock class too: zero here
    "ernie4_5_moe": Tiny({"hidden_size": 128}, bias=0.0),
    # score_func, route_norm, n_group, topk_group: read by vLLM's class, carried by the hub's config.json only
    "afmoe": Tiny({"hidden_size": 128, "head_dim": 32, **AFMOE_HUB_KEYS}, TWO_OR_MORE),
    # its full-attention layers' own head size (per_layer_config) is shrunk to 8 too: vLLM CPU needs 32 or more
    "gemma4_text": Tiny({"hidden_size": 128, "head_dim": 32, "per_layer_config": {"3": {"head_dim": 64}}}),
    # swigluoai experts are not padded by vLLM CPU's fused-MoE kernel: intermediate size a multiple of 32 (the tiny
    # default 48 gave 'No Unquantized MoE backend supports the deployment configuration'; gpt-oss' own is 2880)
    "gpt_oss": Tiny({"head_dim": 32, "intermediate_size": 32}),
    # vLLM's own class differs from transformers by 2.9e-3 (log-probs up to 5.1e-2) on the unpruned tiny model
    "cohere2_moe": Tiny({"head_dim": 32, "hidden_size": 128}, tolerance=(6e-3, 0.1)),
    # log-probs up to 1.8e-3 off (2.6e-3 at per-layer top-k, test_allocate_topk): vLLM's non-MLA attention, its own
    # class is 2.9e-3 off on the unpruned tiny model
    "deepseek_v2": Tiny(DEEPSEEK_V2, tolerance=(1e-4, 1e-2)),
}


def tiny_model(model_type: str, folder: Path, tiny: Tiny) -> Path:
    """A tiny random `model_type` saved to `folder` (tests/tiny_models.py's config for its families, else the
    derivation's shrunk defaults, as tests/test_derived.py builds them), its experts and routers made to matter."""
    from tiny_models import TINY, tiny_config
    from transformers import AutoModelForCausalLM

    from moe_prune.architectures.derive_shrink import shrink_config

    overrides = tiny.overrides
    config = tiny_config(model_type, **overrides) if model_type in TINY else shrink_config(model_type, overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # default init is tiny; experts and routers must matter for the check to fail
        for name, param in model.named_parameters():
            if "correction_bias" in name or name.endswith("expert_bias"):  # before "gate": ERNIE's sits in its gate
                param.normal_(0.0, tiny.bias)
            elif any(part in name for part in ("experts", "gate", "router", "input_linear", "output_linear")):
                param.normal_(0.0, 0.3)
        for name, buffer in model.named_buffers():  # a buffer, not a parameter, in DeepSeek-V3, GLM-4-MoE, EXAONE
            if "correction_bias" in name:
                buffer.normal_(0.0, tiny.bias)
    model.save_pretrained(folder)
    return folder


def tiny_ragged(model_type: str, tmp: Path) -> Path:
    """A tiny random `model_type` (`tiny_model`) pruned to different expert counts per layer."""
    ckpt = Checkpoint.open(tiny_model(model_type, tmp / model_type, TINY_RAGGED[model_type]))
    kept = TINY_RAGGED[model_type].keep
    keep = {layer: kept[i % len(kept)] for i, layer in enumerate(ckpt.identity.moe_layers)}
    prune.run(ckpt.folder, DropMask.create(ckpt.identity, keep, "test"), tmp / f"{model_type}_ragged")
    return tmp / f"{model_type}_ragged"
