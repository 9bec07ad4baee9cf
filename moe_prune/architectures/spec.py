"""What moe-prune needs to know about one MoE family, as plain data.

Keys are relative to one decoder layer (`layer_prefix` with `{L}` for its index) and are
matched with any wrapper prefix in front (e.g. a multimodal model's `language_model.`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Routing:
    """How router logits become expert choices; used to compute router probabilities."""

    score: str = "softmax"  # softmax | sigmoid: how logits become per-expert probabilities
    select_on: str = "scores"  # scores | logits | scores+bias | logits+bias (kolibri1): what top-k ranks
    renormalize: bool | str = True  # True/False, or the config key that decides (e.g. norm_topk_prob)
    grouped: bool = False  # n_group / topk_group group-limited selection


@dataclass(frozen=True)
class ExpertTensor:
    """Where the intermediate (hidden-neuron) axis lies in one expert's tensor, for permutation alignment.

    `suffix` ends the tensor's key (after a dot); `axis` indexes ONE expert's tensor (the expert axis of
    fused tensors removed, dbrx's [E*I, H] seen as E blocks of [I, H]); None for tensors without
    that axis (e.g. gpt-oss down_proj_bias), which are only averaged. `parts` = 2 when gate and up
    share the tensor: `interleaved` (gate = [::2], up = [1::2]) or concatenated (gate, then up).
    """

    suffix: str
    axis: int | None
    parts: int = 1
    interleaved: bool = False


# Legacy per-expert keys (Mixtral w1/w3/w2, Qwen gate/up/down_proj) and transformers 5's fused in-memory
# layout (gate_up_proj [E, 2I, H], down_proj [E, H, I]); families that differ override the field.
STANDARD_EXPERT_TENSORS: tuple[ExpertTensor, ...] = (
    ExpertTensor("w1.weight", 0),
    ExpertTensor("w3.weight", 0),
    ExpertTensor("w2.weight", 1),
    ExpertTensor("gate_proj.weight", 0),
    ExpertTensor("up_proj.weight", 0),
    ExpertTensor("down_proj.weight", 1),
    ExpertTensor("gate_up_proj", 0, parts=2),
    ExpertTensor("down_proj", 1),
)


@dataclass(frozen=True)
class Adapter:
    """One row of the architecture table."""

    model_type: str
    expert_count_keys: tuple[str, ...]  # every alias of the routed-expert count; dotted for nested configs
    top_k_keys: tuple[str, ...]
    moe_layers: str  # name of a rule in architectures.layer_rules
    router: str  # router weight [E, H]; rows are experts
    experts: str  # container prefix: `{experts}{e}.*` per expert, `{experts}<name>` fused [E, ...]
    layer_prefix: str = "model.layers.{L}."
    fused_experts: tuple[str, ...] = ()  # fused expert tensors outside `experts` (leading expert axis)
    # Other per-expert tensors, whole keys with the expert axis first (gemma4: router.per_expert_scale [E]).
    expert_vectors: tuple[str, ...] = ()
    router_bias: str | None = None  # added to logits; sliced with the router rows
    selection_bias: str | None = None  # added to scores for selection only; expert axis is the last
    # Router rows (and router/selection bias entries) after the E routed experts that are not experts and stay
    # after the kept ones: a count, or the config key holding it (inkling_text: a row per shared expert).
    router_tail: int | str = 0
    # A pick of such a row reaches the experts as expert 0 with weight 0 (zaya's skip expert): counted as no expert's.
    tail_picks_masked: bool = False
    # The tail rows are experts the experts module holds too (longcat_flash's identity 'zero experts': gate/up
    # weights it never uses, per-expert keys E.. or fused rows past E): kept, renumbered, after the kept experts.
    tail_experts: bool = False
    # Tensors (whole keys, expert axis first) of a second expert set that the expert-count key sizes too (jetmoe's
    # attention experts and their router): prune keeps the kept experts' slots, merge the anchors'; never averaged.
    lockstep: tuple[str, ...] = ()
    # Modules (in a decoder layer) that a ragged checkpoint rebuilds per layer besides the MoE block (jetmoe:
    # its attention, whose experts follow the layer's count).
    ragged_extra_blocks: tuple[str, ...] = ()
    # grouped selection (jetmoe): module whose forward(inputs, expert_sizes) returns every routed row grouped by
    # expert in ascending order; the router's output holds the gates of those rows at index 2.
    grouped_outputs: str = ""
    router_width_key: str = "hidden_size"  # config key of the router weight's columns (zaya: its router MLP's width)
    routing: Routing = Routing()
    layer_count_key: str = "num_hidden_layers"  # or a per-layer type list whose length is the count (nemotron_h)
    group_count_key: str = "n_group"  # expert groups of grouped routing (bailing_hybrid: num_expert_group)
    shared_expert_keys: tuple[str, ...] = ()  # config keys that size the always-on shared experts
    runtime_layers: str = "model.layers"  # module path of the decoder layer list in memory
    runtime_router: str = "mlp.gate"  # module path of the router inside one loaded decoder layer
    runtime_experts: str = "mlp.experts"
    router_logits_output: int | None = 0  # index of the logits in the router's output (None: the output is them)
    # experts_args: (hidden, top_k_index, top_k_weights); router_scores (llama4); grouped (top-k of logits, outputs
    # read at grouped_outputs)
    selection_from: str = "experts_args"
    # overrides for checkpoints saved with in-memory (fused) names: (field, value) pairs
    memory_keys: tuple[tuple[str, str | tuple[str, ...]], ...] = ()
    # Token mixers inside one loaded decoder layer (`finetune --train attention`); linear/SSM ones included.
    runtime_attention: tuple[str, ...] = ("self_attn", "linear_attn")
    # Attributes holding top-k on the router, on its MoE block and on the CausalLM (read at every forward).
    runtime_top_k_attrs: tuple[str, ...] = ("top_k", "num_experts_per_tok")
    expert_tensors: tuple[ExpertTensor, ...] = STANDARD_EXPERT_TENSORS  # intermediate axes, for `merge`

    def memory_layout(self) -> Adapter:
        """The same family with the key names of `save_pretrained(..., save_original_format=False)`.

        transformers 5 renames modules in memory (e.g. Mixtral's block_sparse_moe -> mlp) and fuses
        experts; checkpoints written that way name tensors after the runtime modules.
        """
        fields: dict[str, object] = {
            "router": f"{self.runtime_router}.weight",
            "experts": f"{self.runtime_experts}.",
            "fused_experts": (),
        }
        fields.update(dict(self.memory_keys))
        return replace(self, **fields)
