"""Which ragged checkpoints moe-prune's vLLM plugin serves: data only, no vLLM (prune and merge read it to warn).

A ragged checkpoint names transformers' causal-LM class of its family in `moe_prune_ragged.base_class`; the plugin
(moe_prune/serving/vllm_plugin.py) registers `MoePruneRagged<base_class>` as a subclass of the vLLM architecture
listed in SERVED, building each of its decoder layers with that layer's expert count and top-k. A family is
listed there once a ragged tiny model of it served on vLLM's CPU build with transformers' prompt log-probs
(tests/test_vllm_serving.py; DeepSeek by hand, see its note); NOT_SERVED says why others are not (measured there).
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

from moe_prune.errors import MoePruneWarning


class Served(NamedTuple):
    """How vLLM serves one family's ragged checkpoints."""

    architecture: str  # vLLM's architecture name (its model class is subclassed)
    min_experts: int = 1  # experts every layer needs in vLLM's class (a 1-expert layer is a dense MLP, or top-2 only)
    note: str = ""  # what the check in tests/test_vllm_serving.py could not cover


DEEPSEEK = "checked by hand on vLLM CPU without MLA; log-probs as close to transformers' as stock vLLM's"
DEEPSEEK_V3 = (
    "checked by hand on vLLM CPU without MLA: layers at their own sizes, log-probs 3.1e-3 off (stock not compared)"
)
# transformers' causal-LM class (the block's base_class) -> how vLLM serves it.
SERVED: dict[str, Served] = {
    "MixtralForCausalLM": Served("MixtralForCausalLM"),
    "OlmoeForCausalLM": Served("OlmoeForCausalLM"),
    "Qwen2MoeForCausalLM": Served("Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": Served("Qwen3MoeForCausalLM"),
    "Llama4ForCausalLM": Served("Llama4ForCausalLM"),
    "GraniteMoeForCausalLM": Served("GraniteMoeForCausalLM"),
    "Glm4MoeForCausalLM": Served("Glm4MoeForCausalLM", min_experts=2),  # grouped top-k sums each group's best two
    # Measured by hand (not in the test lane): layers built at their own sizes; log-probs 1.5e-4 (V2) and 3.1e-3 (V3)
    # from transformers' in float32 with VLLM_MLA_DISABLE=1 (vLLM CPU's MLA takes bfloat16 only), where vLLM's own
    # class differs by 5.4e-4 on the unpruned tiny DeepSeek-V2: the gap is vLLM's attention, not the expert sizes.
    "DeepseekV2ForCausalLM": Served("DeepseekV2ForCausalLM", note=DEEPSEEK),
    "DeepseekV3ForCausalLM": Served("DeepseekV3ForCausalLM", min_experts=2, note=DEEPSEEK_V3),
}

TRANSFORMERS_BACKEND = "vLLM 0.32 runs this family through its Transformers backend, which sizes every layer alike"
NO_CLASS = "vLLM 0.32 has no model class for it"
# base_class -> why vLLM cannot serve its ragged checkpoints through the plugin.
NOT_SERVED: dict[str, str] = {
    "HunYuanMoEV1ForCausalLM": TRANSFORMERS_BACKEND,
    "FlexOlmoForCausalLM": TRANSFORMERS_BACKEND,
    "MellumForCausalLM": TRANSFORMERS_BACKEND,
    # vLLM has the class; the plugin does not register it until a ragged tiny model serves right on vLLM CPU:
    "GptOssForCausalLM": "not checked: vLLM CPU has no unquantized fused-MoE kernel for it",
    "Qwen3NextForCausalLM": "not checked: vLLM CPU's gated-delta-net attention takes bfloat16 only",
    "JambaForCausalLM": "not checked: vLLM's CPU build has no Mamba selective-scan kernel",
    "Ernie4_5_MoeForCausalLM": "built at its own sizes, but log-probs 1.5e-3 from transformers' (unexplained)",
    "Lfm2MoeForCausalLM": "built at its own sizes, but log-probs 5.3e-3 from transformers' (unexplained)",
    "DbrxForCausalLM": "not checked: vLLM 0.32 refuses the dbrx config.json transformers 5 writes (unknown kwargs)",
    "PhimoeForCausalLM": "vLLM CPU gave NaN log-probs for a ragged tiny PhiMoE (top-2 routing only); not served",
    "MiniMaxM2ForCausalLM": "not checked: vLLM's class reads rotary_dim and scoring_func, which transformers lacks",
    **dict.fromkeys(
        (
            "AriaTextForCausalLM",
            "AXK2ForCausalLM",
            "BailingHybridForCausalLM",
            "BeamForCausalLM",
            "Dots1ForCausalLM",
            "FlintForCausalLM",
            "Inkling2ForCausalLM",
            "Kolibri1ForCausalLM",
            "MiniMaxForCausalLM",
            "MiniMaxM3VLForCausalLM",
            "SolarOpenForCausalLM",
            "ZayaForCausalLM",
        ),
        NO_CLASS,
    ),
}
DEFAULT_REASON = "not checked with moe-prune's vLLM plugin yet"


def ragged_base_class(config: dict[str, Any]) -> str | None:
    """The block's base_class of a config.json (the block sits in a wrapper's text config), or None."""
    from moe_prune.architectures.config import RAGGED_KEY, TEXT_CONFIG_KEYS

    holders = [config, *(config.get(key) for key in TEXT_CONFIG_KEYS)]
    for holder in holders:
        spec = holder.get(RAGGED_KEY) if isinstance(holder, dict) else None
        if isinstance(spec, dict) and isinstance(spec.get("base_class"), str):
            return spec["base_class"]
    return None


def vllm_architecture(config: dict[str, Any]) -> str | None:
    """vLLM's architecture the plugin builds a ragged config.json on, or None (not ragged, or not served)."""
    served = SERVED.get(ragged_base_class(config) or "")
    return served.architecture if served else None


def unserved_reason(base_class: str, counts: dict[int, int]) -> str | None:
    """Why vLLM cannot serve a ragged `base_class` checkpoint with these per-layer expert counts, or None."""
    served = SERVED.get(base_class)
    if served is None:
        return NOT_SERVED.get(base_class, DEFAULT_REASON)
    small = [layer for layer, n in sorted(counts.items()) if n < served.min_experts]
    if small:
        need = f"vLLM's {served.architecture} needs {served.min_experts} experts in every layer"
        return f"{need}; layer {small[0]} keeps fewer"
    return None


def warn_if_unserved(base_class: str, counts: dict[int, int]) -> None:
    """One warning line when a ragged checkpoint is written that the vLLM plugin cannot serve."""
    reason = unserved_reason(base_class, counts)
    if reason is not None:
        warnings.warn(
            f"different expert counts per layer: vLLM cannot serve this {base_class} checkpoint ({reason}); "
            "transformers loads it through moe-prune or with trust_remote_code=True",
            MoePruneWarning,
            stacklevel=3,
        )
