"""Tiny random configs of every supported MoE family, for tests that need real checkpoints."""

from __future__ import annotations

from typing import Any

COMMON: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}

TINY: dict[str, dict[str, Any]] = {
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2},
    "minimax": {"num_local_experts": 8, "num_experts_per_tok": 2, "layer_types": None},
    # minimax_m2's and olmoe's default special token ids lie past the 128-token vocabulary (config.json refuses them)
    "minimax_m2": {"num_local_experts": 8, "num_experts_per_tok": 2, "bos_token_id": 1, "eos_token_id": 1},
    "phimoe": {"num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": 40,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [0],
    },
    "qwen3_moe": {
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 24,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],
        "head_dim": 8,
    },
    "qwen3_next": {
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": 24,
        "head_dim": 8,
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 8,
        "linear_value_head_dim": 8,
        "layer_types": ["linear_attention", "full_attention", "linear_attention"],
    },
    "olmoe": {"num_experts": 8, "num_experts_per_tok": 2, "eos_token_id": 1},
    "flex_olmo": {"num_experts": 8, "num_experts_per_tok": 2, "pad_token_id": 0, "eos_token_id": 1},
    "deepseek_v2": {
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 24,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "n_group": 2,
        "topk_group": 1,
        "topk_method": "group_limited_greedy",
        "kv_lora_rank": 16,
        "q_lora_rank": None,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
        "num_key_value_heads": 4,
    },
    "deepseek_v3": {
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 24,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "n_group": 2,
        "topk_group": 1,
        "kv_lora_rank": 16,
        "q_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
        "num_key_value_heads": 4,
    },
    "glm4_moe": {
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 24,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "head_dim": 8,
    },
    "dots1": {
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 24,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "head_dim": 8,
    },
    "ernie4_5_moe": {
        "moe_num_experts": 8,
        "moe_k": 2,
        "moe_intermediate_size": 24,
        "moe_num_shared_experts": 1,
        "moe_layer_start_index": 1,
        "moe_layer_interval": 1,
    },
    "hunyuan_v1_moe": {"num_experts": 8, "moe_topk": 2, "num_shared_expert": 1, "head_dim": 8},
    "jamba": {
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
        "attn_layer_period": 2,
        "attn_layer_offset": 0,
        "mamba_d_state": 4,
        "mamba_d_conv": 2,
        "mamba_expand": 2,
        "mamba_dt_rank": 4,
        "use_mamba_kernels": False,
        "num_hidden_layers": 4,
    },
    "granitemoe": {"num_local_experts": 8, "num_experts_per_tok": 2},
    "granitemoeshared": {"num_local_experts": 8, "num_experts_per_tok": 2, "shared_intermediate_size": 24},
    # A sliding window shorter than the test sequences, so sliding and full attention layers differ.
    "gpt_oss": {
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "head_dim": 8,
        "layer_types": None,
        "sliding_window": 8,
    },
    "llama4_text": {
        "num_local_experts": 8,
        "num_experts_per_tok": 1,
        "intermediate_size_mlp": 40,
        "interleave_moe_layer_step": 1,
        "head_dim": 8,
    },
    "lfm2_moe": {
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 24,
        "num_dense_layers": 1,
        "layer_types": ["full_attention", "conv", "full_attention"],
    },
    "dbrx": {},
}

DBRX = {
    "vocab_size": 128,
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 4,
    "max_seq_len": 128,
    "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
    "ffn_config": {"ffn_hidden_size": 48, "moe_num_experts": 8, "moe_top_k": 2},
}


def tiny_config(model_type: str, **overrides: Any):
    """Build a tiny config of `model_type` (fields in `overrides` replaced); dbrx names its fields differently."""
    from transformers import AutoConfig

    if model_type == "dbrx":
        return AutoConfig.for_model("dbrx", **{**DBRX, **overrides})
    kwargs = {**COMMON, **TINY[model_type], **overrides}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return AutoConfig.for_model(model_type, **kwargs)


def build_tiny(model_type: str, folder, seed: int = 0):
    """Save a random tiny model of `model_type` into `folder` and return it (eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    with torch.no_grad():  # default init is tiny; make experts and routers matter so tests can fail
        for name, param in model.named_parameters():
            if any(part in name for part in ("experts", "router", "gate", "input_linear", "output_linear")):
                param.normal_(0.0, 0.3)
            elif name.endswith("bias") or "correction_bias" in name:
                param.normal_(0.0, 0.5)
    model.eval()
    model.save_pretrained(folder)
    return model


def save_char_tokenizer(folder) -> None:
    """A character-level tokenizer whose ids fit the tiny models' 128-token vocabulary."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1}
    for char in string.printable:
        vocab.setdefault(char, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(folder)
