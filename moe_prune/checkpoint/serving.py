"""Which ragged checkpoints moe-prune's vLLM plugin serves: data only, no vLLM (prune and merge read it to warn).

A ragged checkpoint names transformers' causal-LM class of its family in `moe_prune_ragged.base_class`; the plugin
(moe_prune/serving/vllm_plugin.py) registers `MoePruneRagged<base_class>` as a subclass of the vLLM architecture
listed in SERVED, building each of its decoder layers with that layer's expert count and top-k. A family is
listed there once a ragged tiny model of it served on vLLM's CPU build with transformers' prompt log-probs
(tests/test_vllm_serving.py; GLM-4-MoE-Lite and DeepSeek-V3 in tests/test_vllm_mtp.py, with MTP drafting); NOT_SERVED
says why others are not (measured there).
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

from moe_prune.errors import MoePruneWarning


class Served(NamedTuple):
    """How vLLM serves one family's ragged checkpoints."""

    architecture: str | None = None  # vLLM's architecture name (its class is subclassed); None: transformers' name
    min_experts: int = 1  # experts every layer needs in vLLM's class (a 1-expert layer is a dense MLP, or top-2 only)
    note: str = ""  # what the check in tests/test_vllm_serving.py could not cover
    # vLLM's multi-token-prediction architecture the plugin builds for speculative decoding of a ragged checkpoint,
    # its MTP MoE layers at the last MoE layer's count and top-k (tests/test_vllm_mtp.py); "": the plugin refuses
    # MTP drafting of the family's ragged checkpoints
    mtp: str = ""
    # vLLM's MTP class builds an MoE MTP layer (the plugin sizes it); False: a dense one (vLLM's ERNIE-4.5 and
    # EXAONE-MoE MTP classes: nothing to size, the name lets vLLM draft). prune and merge keep MTP MoE layers in a
    # ragged checkpoint only where this holds and `mtp` is named (else --drop-mtp); dense MTP layers are copied
    mtp_moe: bool = True


DEEPSEEK_V2 = (
    "checked on vLLM CPU without MLA: 4.0e-5 off, log-probs up to 1.8e-3 (vLLM's non-MLA attention: its own class "
    "is 2.9e-3 off on the unpruned tiny model)"
)
DEEPSEEK_V3 = (
    "checked on vLLM CPU without MLA (tests/test_vllm_mtp.py, with MTP drafting): 8.0e-5 off, log-probs up to 2.4e-3 "
    "(vLLM's non-MLA attention: its own class is 2.9e-3 off on the unpruned tiny model)"
)
ERNIE = (
    "vLLM's CPU router ignores softmax routers' expert-selection bias (moe_statics), in its own class too: "
    "a stock tiny ERNIE with random bias is 9.7e-3 off, with it zero 5e-10; its GPU router applies it"
)
TWO_CHECKED = "checked with 2 or more experts per layer"
COHERE2 = "log-probs 1.1e-3 from transformers', as vLLM's own class on the unpruned tiny model (2.9e-3): vLLM's"
LFM2 = (
    "checked by hand: log-probs 1.0e-2 from transformers', as vLLM's own class on the unpruned tiny model (1.1e-2; "
    "4.6e-3 without its conv layers): vLLM's, cause not found"
)
GLM_LITE = (
    "checked on vLLM CPU without MLA (tests/test_vllm_mtp.py, with MTP drafting): 2.6e-5 off, log-probs up to 3.9e-3 "
    "(vLLM's non-MLA attention: its own class was 2.1e-4 off on an unpruned tiny model, by hand)"
)
AFMOE = "vLLM's class reads score_func, route_norm, n_group and topk_group, which only the hub's config.json carries"
# transformers' causal-LM class (the block's base_class) -> how vLLM serves it. Each row was served ragged on vLLM's
# CPU build in float32 with transformers' log-probs (tests/test_vllm_serving.py TINY_RAGGED), unless its note says.
SERVED: dict[str, Served] = {
    "MixtralForCausalLM": Served(),
    "OlmoeForCausalLM": Served(),
    "Qwen2MoeForCausalLM": Served(),
    "Qwen3MoeForCausalLM": Served(),
    "Llama4ForCausalLM": Served(),
    "GraniteMoeForCausalLM": Served(),
    "GraniteMoeSharedForCausalLM": Served(),
    "GraniteMoeSWAForCausalLM": Served(),
    "Glm4MoeForCausalLM": Served(min_experts=2, mtp="Glm4MoeMTPModel"),  # grouped top-k sums each group's best two
    # transformers' own routing needs two
    "ExaoneMoeForCausalLM": Served(min_experts=2, note=TWO_CHECKED, mtp="ExaoneMoeMTP", mtp_moe=False),
    "Ernie4_5_MoeForCausalLM": Served(note=ERNIE, mtp="ErnieMTPModel", mtp_moe=False),
    "Cohere2MoeForCausalLM": Served(note=COHERE2),
    "Gemma4ForCausalLM": Served(),
    "AfmoeForCausalLM": Served(min_experts=2, note=AFMOE),  # grouped top-k (one group) sums each group's best two
    "Lfm2MoeForCausalLM": Served(min_experts=2, note=LFM2),  # the same grouped top-k
    "Glm4MoeLiteForCausalLM": Served(min_experts=2, note=GLM_LITE, mtp="Glm4MoeLiteMTPModel"),  # the same grouped top-k
    "GptOssForCausalLM": Served(),
    # served in float32 with VLLM_MLA_DISABLE=1 (vLLM CPU's MLA takes bfloat16 only): the log-prob gap is vLLM's
    # attention, as large for its own class on the unpruned tiny models (tests/vllm_tiny.py, tests/test_vllm_mtp.py)
    "DeepseekV2ForCausalLM": Served(note=DEEPSEEK_V2),
    "DeepseekV3ForCausalLM": Served(min_experts=2, note=DEEPSEEK_V3, mtp="DeepSeekMTPModel"),
}

TRANSFORMERS_BACKEND = "vLLM 0.32 runs this family through its Transformers backend, which sizes every layer alike"
NO_CLASS = "vLLM 0.32 has no model class for it"
HUB_KEYS = "not checked: vLLM's class reads config keys of the hub's config.json that transformers' config lacks"
# base_class -> why vLLM cannot serve its ragged checkpoints through the plugin. Where vLLM has the class, the
# reason is what serving a ragged tiny model of it on vLLM's CPU build gave (tests/test_vllm_registry.py holds the
# "no class" and "Transformers backend" rows to vLLM's registry).
NOT_SERVED: dict[str, str] = {
    "HunYuanMoEV1ForCausalLM": TRANSFORMERS_BACKEND,
    "FlexOlmoForCausalLM": TRANSFORMERS_BACKEND,
    "MellumForCausalLM": TRANSFORMERS_BACKEND,
    "Qwen3NextForCausalLM": "not checked: vLLM CPU's gated-delta-net attention takes bfloat16 only",
    "JambaForCausalLM": "not checked: vLLM's CPU build has no Mamba selective-scan kernel",
    "DbrxForCausalLM": "not checked: vLLM 0.32 refuses the dbrx config.json transformers 5 writes (unknown kwargs)",
    "PhimoeForCausalLM": "vLLM CPU gave NaN log-probs for a ragged tiny PhiMoE (top-2 routing only); not served",
    "MiniMaxM2ForCausalLM": (
        "not checked: vLLM CPU's router has no ungrouped sigmoid top-k (AssertionError), stock too, with the hub's "
        "rotary_dim, scoring_func and use_routing_bias given"
    ),
    "MiMoV2FlashForCausalLM": f"{HUB_KEYS} (hybrid_layer_pattern, moe_layer_freq, swa_* ...)",
    "InklingForCausalLM": f"{HUB_KEYS} (padded_vocab_size)",
    "HYV3ForCausalLM": f"{HUB_KEYS} (first_k_dense_replace, expert_hidden_dim) and weight names (no k_norm)",
    "LagunaForCausalLM": "not checked: vLLM CPU's router has no ungrouped sigmoid top-k (AssertionError), stock too",
    "NemotronHForCausalLM": "not checked: vLLM CPU has no fused-MoE kernel for non-gated (relu2) experts",
    "KimiLinearForCausalLM": "not checked: vLLM CPU's KDA linear attention fails ('_lib_fn_wrapper' has no 'get')",
    **dict.fromkeys(
        ("GraniteMoeHybridForCausalLM", "LongcatFlashForCausalLM"),
        "not checked: the tiny random model the check needs did not run in transformers (shrunk config)",
    ),
    "AXK1ForCausalLM": "not checked: vLLM's AXK1 class expects post_mlp_layernorm weights transformers' AXK1 lacks",
    **dict.fromkeys(
        ("DeepseekV32ForCausalLM", "GlmMoeDsaForCausalLM"),
        "not checked: vLLM CPU has no sparse (DSA) attention ('Sparse Attention is not supported on CPU')",
    ),
    **dict.fromkeys(
        ("Qwen3_5MoeForCausalLM", "Qwen4ExpForCausalLM"),
        "not checked: vLLM 0.32's module for it imports torchvision, which its CPU venv cannot keep",
    ),
    **dict.fromkeys(
        ("Dots3NoteForCausalLM", "HYV4ForCausalLM"),
        "not checked: transformers 5.19, which vLLM 0.32 pins, lacks this family (or its config fields)",
    ),
    **dict.fromkeys(
        (
            "AriaTextForCausalLM",
            "AXK2ForCausalLM",
            "BailingHybridForCausalLM",
            "BeamForCausalLM",
            "Dots1ForCausalLM",
            "FlintForCausalLM",
            "Inkling2ForCausalLM",
            "JetMoeForCausalLM",
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


def served_architecture(base_class: str) -> str:
    """vLLM's architecture of a served family: in vLLM 0.32 every served family's has transformers' class name
    (tests/test_vllm_serving.py checks each against vLLM's registry), unless its row names another."""
    return SERVED[base_class].architecture or base_class


def vllm_architecture(config: dict[str, Any]) -> str | None:
    """vLLM's architecture the plugin builds a ragged config.json on, or None (not ragged, or not served)."""
    base = ragged_base_class(config) or ""
    return served_architecture(base) if base in SERVED else None


def unserved_reason(base_class: str, counts: dict[int, int]) -> str | None:
    """Why vLLM cannot serve a ragged `base_class` checkpoint with these per-layer expert counts, or None."""
    served = SERVED.get(base_class)
    if served is None:
        return NOT_SERVED.get(base_class, DEFAULT_REASON)
    small = [layer for layer, n in sorted(counts.items()) if n < served.min_experts]
    if small:
        need = f"vLLM's {served_architecture(base_class)} needs {served.min_experts} experts in every layer"
        return f"{need}; layer {small[0]} keeps fewer"
    return None


def ragged_mtp_architecture(base_class: str) -> str:
    """vLLM's MTP architecture of a family whose ragged checkpoints keep MTP MoE layers (the plugin sizes them), or
    "" (a family vLLM does not draft for ragged, or whose vLLM MTP layer is dense: MTP experts would not load)."""
    served = SERVED.get(base_class)
    return served.mtp if served and served.mtp_moe else ""


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
