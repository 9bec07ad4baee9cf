"""The two MoE families moe-prune refuses (architectures/table.py REFUSED): each reason measured on transformers' own
tiny model, so the README's "refused, and why" is held to behaviour.

deepseek_v4: its hash_moe layers pick experts by a frozen token-id -> expert table (`gate.tid2eid`), not by the
router. The masked original of a pruned hash layer (dropped experts' router logits -inf: sqrtsoftplus gives them
score 0, the kept picks renormalised) has no stock-checkpoint form: an id past the kept experts fails transformers'
router gather, and pointing a dropped expert's entries at a kept one equals it only while every token keeps a share
of its top-k picks that divides top-k. One expert count (n_routed_experts) sizes every layer, so the top-k layers
cannot be pruned alone in a stock checkpoint either.

doge: its CDMoE block reaches expert i * num_keys + j through a product-key grid (router_gate has 2 * num_keys
rows for num_experts = num_keys ** 2 experts), so an expert has no router row to drop, and a non-square count
leaves experts no key pair reaches.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_prune.architectures import derived_adapter
from moe_prune.architectures.derive_shrink import shrink_config
from moe_prune.architectures.table import REFUSED

KEEP = [0, 1, 2, 4]  # of 8 experts, in every MoE layer


class _MaskedScore(torch.nn.Module):
    """The router's score function with the dropped experts' logits set to -inf first (the masked original)."""

    def __init__(self, inner: torch.nn.Module, dropped: list[int]) -> None:
        super().__init__()
        self.inner, self.dropped = inner, dropped

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[:, self.dropped] = float("-inf")
        return self.inner(logits)


def _v4(top_k: int):
    """A tiny DeepSeek-V4 (one hash layer, then top-k layers) with experts, routers and the hash table randomised."""
    torch.manual_seed(0)
    config = shrink_config("deepseek_v4")
    config.num_experts_per_tok = top_k
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "experts" in name or ".gate." in name:
                param.normal_(0.0, 0.3)
        for layer in model.model.layers:
            if layer.mlp.is_hash:
                rows = [torch.randperm(config.n_routed_experts)[:top_k] for _ in range(config.vocab_size)]
                layer.mlp.gate.tid2eid.copy_(torch.stack(rows))
    return config, model


def _pruned(config, model, remap):
    """Stock DeepSeek-V4 with KEEP in every layer, expert axes sliced, hash tables rewritten by `remap`."""
    small = copy.deepcopy(config)
    small.n_routed_experts = len(KEEP)
    out = AutoModelForCausalLM.from_config(small).eval()
    new_id = {old: new for new, old in enumerate(KEEP)}
    state = {}
    for name, value in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj", "gate.weight", "e_score_correction_bias")):
            value = value[KEEP]
        if name.endswith("tid2eid"):
            value = torch.tensor([remap([int(e) for e in row], new_id) for row in value])
        state[name] = value
    out.load_state_dict(state, strict=True)
    return out


def _masked_logits(model, ids: torch.Tensor, dropped: list[int]) -> torch.Tensor:
    masked = copy.deepcopy(model)
    for layer in masked.model.layers:
        layer.mlp.gate.score_fn = _MaskedScore(layer.mlp.gate.score_fn, dropped)
    return masked(ids).logits


def _past_the_end(row: list[int], new_id: dict[int, int]) -> list[int]:
    return [new_id.get(e, len(new_id)) for e in row]  # DeepseekV4Experts skips id num_experts


def _to_a_kept_pick(row: list[int], new_id: dict[int, int]) -> list[int]:
    kept = [new_id[e] for e in row if e in new_id]
    return [new_id[e] if e in new_id else (kept[0] if kept else 0) for e in row]


def test_deepseek_v4_is_refused_with_its_reason():
    reason = derived_adapter("deepseek_v4")
    assert reason == REFUSED["deepseek_v4"] and "tid2eid" in reason and "ragged" in reason


@torch.no_grad()
def test_deepseek_v4_hash_layers_have_no_stock_pruned_form():
    config, model = _v4(top_k=2)
    dropped = [e for e in range(config.n_routed_experts) if e not in KEEP]
    hash_layer = next(layer for layer in model.model.layers if layer.mlp.is_hash)
    table = hash_layer.mlp.gate.tid2eid

    # The hash layer's choice is the table's, whatever the router weight says.
    hidden, ids = torch.randn(16, config.hidden_size), torch.arange(16)
    picks = hash_layer.mlp.gate(hidden, ids)[2]
    hash_layer.mlp.gate.weight.mul_(-3.0)
    assert torch.equal(picks, hash_layer.mlp.gate(hidden, ids)[2]) and torch.equal(picks, table[ids])
    hash_layer.mlp.gate.weight.div_(-3.0)

    # One expert count sizes every layer, hash layers included: no stock checkpoint prunes the top-k layers alone.
    smaller = copy.deepcopy(config)
    smaller.n_routed_experts = len(KEEP)
    assert {
        layer.mlp.experts.gate_up_proj.shape[0] for layer in AutoModelForCausalLM.from_config(smaller).model.layers
    } == {len(KEEP)}

    # An id past the kept experts ("no expert" to DeepseekV4Experts) fails the router's gather.
    tokens = torch.arange(config.vocab_size)
    with pytest.raises(RuntimeError, match="out of bounds"):
        _pruned(config, model, _past_the_end)(tokens[None, :24])

    # Pointing a dropped expert's entries at a kept pick: exact while each token keeps one of its two picks,
    # wrong once a token keeps none (the masked original gives it no routed output in that layer).
    some_kept = [t for t in range(config.vocab_size) if any(int(e) in KEEP for e in table[t])]
    none_kept = [t for t in range(config.vocab_size) if all(int(e) not in KEEP for e in table[t])]
    assert none_kept, "the random table should leave some token no kept expert"
    remapped = _pruned(config, model, _to_a_kept_pick)
    ids = torch.tensor([some_kept[:24]])
    assert (remapped(ids).logits - _masked_logits(model, ids, dropped)).abs().max() < 1e-5
    ids = torch.tensor([none_kept[:24]])
    assert (remapped(ids).logits - _masked_logits(model, ids, dropped)).abs().max() > 1e-2


@torch.no_grad()
def test_deepseek_v4_remapped_table_is_wrong_when_the_kept_share_does_not_divide_top_k():
    """Top-k 3, one of a token's picks dropped: two kept picks cannot share three slots evenly."""
    config, model = _v4(top_k=3)
    dropped = [e for e in range(config.n_routed_experts) if e not in KEEP]
    table = next(layer for layer in model.model.layers if layer.mlp.is_hash).mlp.gate.tid2eid
    two_kept = [t for t in range(config.vocab_size) if sum(int(e) in KEEP for e in table[t]) == 2]
    ids = torch.tensor([two_kept[:24]])
    remapped = _pruned(config, model, _to_a_kept_pick)
    assert (remapped(ids).logits - _masked_logits(model, ids, dropped)).abs().max() > 1e-2


def test_doge_experts_are_a_product_key_grid():
    config = shrink_config("doge")
    assert derived_adapter("doge") == REFUSED["doge"]
    config.is_moe, config.num_experts = True, 16  # MoE is off in doge's defaults
    experts = config.num_experts
    block = next(m for m in AutoModelForCausalLM.from_config(config).modules() if type(m).__name__ == "DogeCDMoE")
    keys = block.num_keys
    assert keys * keys == experts and block.router_gate.out_features == 2 * keys != experts
    pruned = copy.deepcopy(config)
    pruned.num_experts = experts - 1  # dropping one expert: the grid shrinks to floor(sqrt(E - 1)) keys a side
    small = next(m for m in AutoModelForCausalLM.from_config(pruned).modules() if type(m).__name__ == "DogeCDMoE")
    assert small.num_keys**2 < small.num_experts  # experts past num_keys ** 2 no key pair reaches
