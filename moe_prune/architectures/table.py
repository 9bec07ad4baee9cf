"""The architecture table: one row per supported `model_type`.

Facts checked against transformers 5.x `save_pretrained` output of tiny random models
(see tests/test_adapters.py); on-disk keys differ from in-memory module names, so both are listed.
"""

from __future__ import annotations

from moe_prune.architectures.spec import STANDARD_EXPERT_TENSORS, Adapter, ExpertTensor, Routing

SOFTMAX = Routing(score="softmax", select_on="scores", renormalize=True)
SOFTMAX_NORM_KEY = Routing(score="softmax", select_on="scores", renormalize="norm_topk_prob")
SOFTMAX_NO_RENORM = Routing(score="softmax", select_on="scores", renormalize=False)
TOPK_THEN_SOFTMAX = Routing(score="softmax", select_on="logits", renormalize=True)
SIGMOID_BIAS_GROUPED = Routing(score="sigmoid", select_on="scores+bias", renormalize="norm_topk_prob", grouped=True)

# Expert tensors whose layout differs from the standard one (where the intermediate axis lies, see spec.py).
GRANITE_EXPERTS = (
    ExpertTensor("input_linear.weight", 0, parts=2),  # [E, 2I, H], gate then up
    ExpertTensor("output_linear.weight", 1),  # [E, H, I]
    *STANDARD_EXPERT_TENSORS,
)
GPT_OSS_EXPERTS = (
    ExpertTensor("gate_up_proj", 1, parts=2, interleaved=True),  # [E, H, 2I], gate = [..., ::2]
    ExpertTensor("gate_up_proj_bias", 0, parts=2, interleaved=True),  # [E, 2I]
    ExpertTensor("down_proj", 0),  # [E, I, H]
    ExpertTensor("down_proj_bias", None),  # [E, H]
)
LLAMA4_EXPERTS = (
    ExpertTensor("gate_up_proj", 1, parts=2),  # [E, H, 2I], gate then up
    ExpertTensor("down_proj", 0),  # [E, I, H]
)
DBRX_EXPERTS = tuple(ExpertTensor(name, 0) for name in ("w1", "v1", "w2"))  # [E*I, H]: E blocks of [I, H]


def _mixtral_like(model_type: str, **overrides) -> Adapter:
    """Mixtral-style keys: block_sparse_moe.gate + experts.{e}.w1/w2/w3."""
    fields = dict(
        model_type=model_type,
        expert_count_keys=("num_local_experts", "num_experts"),
        top_k_keys=("num_experts_per_tok",),
        moe_layers="all",
        router="block_sparse_moe.gate.weight",
        experts="block_sparse_moe.experts.",
        routing=SOFTMAX,
    )
    return Adapter(**{**fields, **overrides})


def _qwen_like(model_type: str, **overrides) -> Adapter:
    """Qwen/DeepSeek-style keys: mlp.gate + mlp.experts.{e}.gate_proj/up_proj/down_proj."""
    fields = dict(
        model_type=model_type,
        expert_count_keys=("num_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_tok",),
        moe_layers="all",
        router="mlp.gate.weight",
        experts="mlp.experts.",
        routing=SOFTMAX_NORM_KEY,
    )
    return Adapter(**{**fields, **overrides})


def _deepseek_like(model_type: str, routing: Routing, **overrides) -> Adapter:
    """DeepSeek/GLM: n_routed_experts, shared experts, first k layers dense, grouped routing."""
    return _qwen_like(
        model_type,
        expert_count_keys=("n_routed_experts",),
        moe_layers="first_k_dense",
        shared_expert_keys=("n_shared_experts",),
        routing=routing,
        **overrides,
    )


def _granite_like(model_type: str, **overrides) -> Adapter:
    """Granite MoE: fused input_linear [E, 2I, H] / output_linear [E, H, I], router.layer."""
    fields = dict(
        model_type=model_type,
        expert_count_keys=("num_local_experts",),
        top_k_keys=("num_experts_per_tok",),
        moe_layers="all",
        router="block_sparse_moe.router.layer.weight",
        experts="block_sparse_moe.experts.",
        fused_experts=("block_sparse_moe.input_linear.", "block_sparse_moe.output_linear."),
        routing=TOPK_THEN_SOFTMAX,
        runtime_router="block_sparse_moe.router",
        runtime_experts="block_sparse_moe.experts",
        expert_tensors=GRANITE_EXPERTS,
    )
    return Adapter(**{**fields, **overrides})


# MoE families of transformers that moe-prune refuses (the derivation fails or was not verified by the tests
# on a tiny model), each with the one-line reason the user sees. A table row above supersedes an entry.
REFUSED: dict[str, str] = {
    # measured in tests/test_refusal_reasons.py on transformers' own tiny DeepSeek-V4
    "deepseek_v4": "its hash_moe layers (mlp_layer_types) pick experts by a frozen token-id -> expert table "
    "(gate.tid2eid [vocab, top-k]), not by the router, and n_routed_experts sizes every layer: a stock checkpoint "
    "cannot mark a dropped expert's table entries as no expert (an id past the kept experts fails transformers' "
    "router gather), and pointing them at a kept expert differs from the masked original once a token keeps "
    "none of its picks, or a share that does not divide top-k; needed: the top-k (moe) layers pruned with the hash "
    "layers kept whole (a ragged checkpoint, moe-prune's model code) and a routing rule for their sqrtsoftplus "
    "scores",
    "doge": "its CDMoE block scores expert i * num_keys + j as x_i + y_j (router_gate [2 * num_keys, H], experts "
    "are down_embed/up_embed rows, num_keys = floor(sqrt(num_experts))), so one expert has no router row to drop; "
    "needed: dropping whole key rows and columns (a smaller square grid, selected per key, not per expert)",
}

# Families whose decoder layers hand state to the next layer beyond the hidden states, so `profile --sequential`
# (one layer at a time from recorded inputs) cannot reproduce their forward: refused with the reason.
NO_SEQUENTIAL: dict[str, str] = {
    "glm_moe_dsa": "its decoder layers pass the sparse-attention indexer's choice (topk_indices) to the next layer",
    "gemma4_text": "its decoder layers take per-layer input embeddings (hidden_size_per_layer_input) computed from "
    "the token ids, which per-layer replay does not reproduce",
    "hy_v4": "its decoder layers pass the sparse-attention indexer's choice (topk_indices) to the next layer",
    "zaya": "its decoder layers pass the router's hidden state to the next layer's router (router_states)",
    "inkling2_text": "its decoder layers share state that per-layer replay does not reproduce (statistics differ)",
}

ROWS: tuple[Adapter, ...] = (
    _mixtral_like("mixtral"),
    _mixtral_like("minimax"),
    _mixtral_like(
        "minimax_m2",
        selection_bias="block_sparse_moe.e_score_correction_bias",
        memory_keys=(("selection_bias", "mlp.e_score_correction_bias"),),
        routing=Routing(score="sigmoid", select_on="scores+bias", renormalize=True),
    ),
    _mixtral_like("phimoe", runtime_router="mlp.router"),
    _qwen_like("qwen2_moe", moe_layers="sparse_step", shared_expert_keys=("shared_expert_intermediate_size",)),
    _qwen_like("qwen3_moe", expert_count_keys=("num_local_experts", "num_experts"), moe_layers="sparse_step"),
    _qwen_like("qwen3_next", moe_layers="sparse_step", shared_expert_keys=("shared_expert_intermediate_size",)),
    _qwen_like("qwen3_5_moe_text", moe_layers="all", shared_expert_keys=("shared_expert_intermediate_size",)),
    _qwen_like("olmoe"),
    _qwen_like("flex_olmo"),
    _deepseek_like("deepseek_v2", Routing(score="softmax", renormalize="norm_topk_prob", grouped=True)),
    _deepseek_like("deepseek_v3", SIGMOID_BIAS_GROUPED, selection_bias="mlp.gate.e_score_correction_bias"),
    _deepseek_like("glm4_moe", SIGMOID_BIAS_GROUPED, selection_bias="mlp.gate.e_score_correction_bias"),
    _deepseek_like("dots1", SIGMOID_BIAS_GROUPED, selection_bias="mlp.gate.e_score_correction_bias"),
    _qwen_like(
        "ernie4_5_moe",
        expert_count_keys=("moe_num_experts",),
        top_k_keys=("moe_k",),
        moe_layers="ernie_interval",
        shared_expert_keys=("moe_num_shared_experts",),
        selection_bias="mlp.moe_statics.e_score_correction_bias",
        memory_keys=(("selection_bias", "mlp.gate.moe_statics.e_score_correction_bias"),),
        routing=Routing(score="softmax", select_on="scores+bias", renormalize=True),
    ),
    _qwen_like(
        "hunyuan_v1_moe",
        top_k_keys=("moe_topk",),
        router="mlp.gate.wg.weight",
        memory_keys=(("router", "mlp.gate.wg.weight"),),
        shared_expert_keys=("num_shared_expert",),
        routing=SOFTMAX,
    ),
    _qwen_like(
        "jamba",
        top_k_keys=("num_experts_per_tok",),
        moe_layers="expert_layer_period",
        router="feed_forward.router.weight",
        experts="feed_forward.experts.",
        routing=SOFTMAX_NO_RENORM,
        runtime_router="feed_forward.router",
        runtime_experts="feed_forward.experts",
        runtime_attention=("self_attn", "mamba"),
    ),
    _qwen_like(
        "lfm2_moe",
        moe_layers="num_dense_layers",
        router="feed_forward.gate.weight",
        experts="feed_forward.experts.",
        selection_bias="feed_forward.expert_bias",
        routing=Routing(score="sigmoid", select_on="scores+bias", renormalize="norm_topk_prob"),
        runtime_router="feed_forward.gate",
        runtime_experts="feed_forward.experts",
        runtime_attention=("self_attn", "conv"),
    ),
    _granite_like("granitemoe"),
    _granite_like("granitemoeshared", shared_expert_keys=("shared_intermediate_size",)),
    _granite_like(
        "granitemoehybrid", shared_expert_keys=("shared_intermediate_size",), runtime_attention=("self_attn", "mamba")
    ),
    _qwen_like(
        "gpt_oss",
        expert_count_keys=("num_local_experts",),
        router="mlp.router.weight",
        router_bias="mlp.router.bias",
        routing=TOPK_THEN_SOFTMAX,
        runtime_router="mlp.router",
        expert_tensors=GPT_OSS_EXPERTS,
    ),
    _qwen_like(
        "llama4_text",
        expert_count_keys=("num_local_experts",),
        moe_layers="moe_layers_list",
        router="feed_forward.router.weight",
        experts="feed_forward.experts.",
        shared_expert_keys=("intermediate_size",),
        routing=Routing(score="sigmoid", select_on="logits", renormalize=False),
        runtime_router="feed_forward.router",
        runtime_experts="feed_forward.experts",
        router_logits_output=1,
        selection_from="router_scores",
        expert_tensors=LLAMA4_EXPERTS,
    ),
    # Its router has a row per shared expert after the routed ones ([E + shared, H]; they weigh the shared experts),
    # which the derivation's [E, H] search does not find; written by hand, tested like the derived families.
    _qwen_like(
        "inkling_text",
        expert_count_keys=("n_routed_experts",),
        moe_layers="derived",
        selection_bias="mlp.gate.e_score_correction_bias",
        router_tail="n_shared_experts",
        shared_expert_keys=("n_shared_experts",),
        routing=Routing(score="sigmoid", select_on="scores+bias", renormalize=True),
        runtime_attention=("self_attn", "attn_sconv"),
    ),
    # Its router is an MLP whose last class is the skip expert (out_proj [E + 1, router_hidden_size], balancing_biases
    # [E + 1]); a skip pick reaches the experts as expert 0 with weight 0. Written by hand, tested like derived ones.
    _qwen_like(
        "zaya",
        moe_layers="derived",
        router="mlp.gate.router_mlp.out_proj.weight",
        selection_bias="mlp.gate.balancing_biases",
        router_tail=1,
        tail_picks_masked=True,
        router_width_key="router_hidden_size",
        memory_keys=(("router", "mlp.gate.router_mlp.out_proj.weight"),),
        routing=Routing(score="softmax", select_on="scores+bias", renormalize=False),
    ),
    # Identity 'zero experts' follow the routed ones in the router ([E + zero_expert_num, H], selection bias alike)
    # and in gate_up_proj (weights never used); a pick of one reaches the experts module as index >= E.
    _qwen_like(
        "longcat_flash",
        expert_count_keys=("n_routed_experts",),
        top_k_keys=("moe_topk",),
        layer_count_key="num_layers",
        router="mlp.router.classifier.weight",
        selection_bias="mlp.router.e_score_correction_bias",
        router_tail="zero_expert_num",
        tail_experts=True,
        routing=Routing(score="softmax", select_on="scores+bias", renormalize=False),
        runtime_router="mlp.router",
        memory_keys=(("router", "mlp.router.classifier.weight"),),
    ),
    # num_local_experts sizes its MLP experts and its attention experts (MoA) alike, so the attention experts, their
    # router rows included, follow the kept MLP experts' slots (lockstep): the result loads in stock transformers.
    _granite_like(
        "jetmoe",
        router="mlp.router.layer.weight",
        experts="mlp.experts.",
        fused_experts=("mlp.input_linear.", "mlp.output_linear."),
        lockstep=tuple(f"self_attention.experts.{t}.weight" for t in ("input_linear", "output_linear", "router.layer")),
        ragged_extra_blocks=("self_attention",),
        runtime_router="mlp.router",
        runtime_experts="mlp",
        router_logits_output=4,
        selection_from="grouped",
        grouped_outputs="mlp.output_linear",
        runtime_attention=("self_attention",),
        memory_keys=(("experts", "mlp.experts."), ("fused_experts", ("mlp.input_linear.", "mlp.output_linear."))),
    ),
    Adapter(
        model_type="dbrx",
        expert_count_keys=("ffn_config.moe_num_experts",),
        top_k_keys=("ffn_config.moe_top_k",),
        layer_count_key="n_layers",
        moe_layers="all",
        layer_prefix="transformer.blocks.{L}.",
        router="ffn.router.layer.weight",
        experts="ffn.experts.mlp.",
        routing=SOFTMAX,
        runtime_layers="transformer.blocks",
        runtime_router="ffn.router",
        runtime_experts="ffn.experts",
        router_logits_output=None,
        runtime_attention=("norm_attn_norm.attn",),
        memory_keys=(("router", "ffn.router.layer.weight"), ("experts", "ffn.experts.mlp.")),
        expert_tensors=DBRX_EXPERTS,
    ),
)
