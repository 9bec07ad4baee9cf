"""The released models `real_shapes` rehearses: their config.json values (as published on the Hub), trimmed
to a few decoder layers by `Preset.config`.

Copied from the releases' config.json: Qwen/Qwen3-30B-A3B, deepseek-ai/DeepSeek-V3 (FP8 128x128 blocks;
its multi-token-prediction layer is left out), openai/gpt-oss-120b (MXFP4 experts) and
mistralai/Mixtral-8x22B-v0.1. Only what the model classes read is kept (no auto_map, no generation keys).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}
MXFP4 = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}


@dataclass(frozen=True)
class Preset:
    """A released model: its config, how many decoder layers it has, the config key of its expert count."""

    config_json: dict[str, Any]
    full_layers: int
    experts_key: str
    dense_layers: int = 0  # leading dense decoder layers kept in the rehearsal (DeepSeek-V3: first_k_dense_replace)
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        return self.config_json["model_type"]

    @property
    def quantization(self) -> str | None:
        quant = self.config_json.get("quantization_config")
        return quant["quant_method"] if quant else None

    def config_value(self, key: str) -> int:
        return int(self.config_json[self.experts_key if key == "experts" else key])

    def config(self, moe_layers: int) -> dict[str, Any]:
        """config.json of the rehearsal: `moe_layers` MoE decoder layers after the kept dense ones."""
        raw = dict(self.config_json)
        layers = self.dense_layers + moe_layers
        raw["num_hidden_layers"] = layers
        if "first_k_dense_replace" in raw:
            raw["first_k_dense_replace"] = self.dense_layers
        if "layer_types" in raw:
            raw["layer_types"] = raw["layer_types"][:layers]
        if "max_window_layers" in raw:
            raw["max_window_layers"] = layers
        return raw

    def moe_layers(self, config: dict[str, Any]) -> int:
        return int(config["num_hidden_layers"]) - self.dense_layers


PRESETS = {
    "qwen3-30b-a3b": Preset(
        {
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "attention_bias": False,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "decoder_sparse_step": 1,
            "head_dim": 128,
            "hidden_act": "silu",
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "max_position_embeddings": 40960,
            "max_window_layers": 48,
            "mlp_only_layers": [],
            "moe_intermediate_size": 768,
            "norm_topk_prob": True,
            "num_attention_heads": 32,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "num_hidden_layers": 48,
            "num_key_value_heads": 4,
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "router_aux_loss_coef": 0.001,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "use_sliding_window": False,
            "vocab_size": 151936,
        },
        full_layers=48,
        experts_key="num_experts",
    ),
    "deepseek-v3-fp8": Preset(
        {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "attention_bias": False,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "first_k_dense_replace": 3,
            "hidden_act": "silu",
            "hidden_size": 7168,
            "intermediate_size": 18432,
            "kv_lora_rank": 512,
            "max_position_embeddings": 163840,
            "moe_intermediate_size": 2048,
            "moe_layer_freq": 1,
            "n_group": 8,
            "n_routed_experts": 256,
            "n_shared_experts": 1,
            "norm_topk_prob": True,
            "num_attention_heads": 128,
            "num_experts_per_tok": 8,
            "num_hidden_layers": 61,
            "num_key_value_heads": 128,
            "num_nextn_predict_layers": 0,
            "q_lora_rank": 1536,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64,
            "quantization_config": FP8,
            "rms_norm_eps": 1e-06,
            "rope_scaling": {
                "beta_fast": 32,
                "beta_slow": 1,
                "factor": 40,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "original_max_position_embeddings": 4096,
                "type": "yarn",
            },
            "rope_theta": 10000,
            "routed_scaling_factor": 2.5,
            "scoring_func": "sigmoid",
            "tie_word_embeddings": False,
            "topk_group": 4,
            "topk_method": "noaux_tc",
            "torch_dtype": "bfloat16",
            "v_head_dim": 128,
            "vocab_size": 129280,
        },
        full_layers=61,
        experts_key="n_routed_experts",
        dense_layers=1,
        notes="one dense layer kept before the MoE layers (the release has 3); no MTP layer",
    ),
    "gpt-oss-120b-mxfp4": Preset(
        {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "attention_bias": True,
            "eos_token_id": 200002,
            "pad_token_id": 199999,
            "experts_per_token": 4,
            "head_dim": 64,
            "hidden_act": "silu",
            "hidden_size": 2880,
            "initial_context_length": 4096,
            "intermediate_size": 2880,
            "layer_types": ["sliding_attention", "full_attention"] * 18,
            "max_position_embeddings": 131072,
            "num_attention_heads": 64,
            "num_experts_per_tok": 4,
            "num_hidden_layers": 36,
            "num_key_value_heads": 8,
            "num_local_experts": 128,
            "quantization_config": MXFP4,
            "rms_norm_eps": 1e-05,
            "rope_scaling": {
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "factor": 32.0,
                "original_max_position_embeddings": 4096,
                "rope_type": "yarn",
                "truncate": False,
            },
            "rope_theta": 150000,
            "router_aux_loss_coef": 0.9,
            "sliding_window": 128,
            "swiglu_limit": 7.0,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "vocab_size": 201088,
        },
        full_layers=36,
        experts_key="num_local_experts",
    ),
    "mixtral-8x22b": Preset(
        {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
            "hidden_size": 6144,
            "intermediate_size": 16384,
            "max_position_embeddings": 65536,
            "num_attention_heads": 48,
            "num_experts_per_tok": 2,
            "num_hidden_layers": 56,
            "num_key_value_heads": 8,
            "num_local_experts": 8,
            "rms_norm_eps": 1e-05,
            "rope_theta": 1000000.0,
            "router_aux_loss_coef": 0.001,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "vocab_size": 32000,
        },
        full_layers=56,
        experts_key="num_local_experts",
    ),
}
