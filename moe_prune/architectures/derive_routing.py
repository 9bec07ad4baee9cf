"""The routing rule of a model type, read by running a tiny real model.

The candidate rules (softmax or sigmoid scores, selection on scores or logits plus a bias, with or
without renormalisation) are checked against the experts' (top_k_index, top_k_weights) computed
from the router's logits; the first one that reproduces them is the rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moe_prune.architectures.derive_models import DerivationError, build, with_value
from moe_prune.architectures.derive_structure import Structure
from moe_prune.architectures.spec import Routing


@dataclass
class _Capture:
    inputs: list[torch.Tensor]
    outputs: list[Any]
    selections: list[tuple[torch.Tensor, torch.Tensor]]


def _capture(model, structure: Structure, vocab: int) -> _Capture:
    layer = model.get_submodule(f"{structure.layers}.{structure.moe_layers[-1]}")
    router, experts = layer.get_submodule(structure.router), layer.get_submodule(structure.experts)
    cap = _Capture([], [], [])

    def on_router(_m, args, output):
        cap.inputs.append(args[0].detach())
        cap.outputs.append(output)

    def on_experts(_m, args, kwargs):
        values = list(args[1:]) + [v for k, v in kwargs.items() if k != "hidden_states"]
        ints = [v for v in values if isinstance(v, torch.Tensor) and not v.is_floating_point()]
        floats = [v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()]
        if ints and floats:
            cap.selections.append((ints[0], floats[0]))

    handles = [router.register_forward_hook(on_router), experts.register_forward_pre_hook(on_experts, with_kwargs=True)]
    torch.manual_seed(0)
    try:
        with torch.no_grad():
            model(torch.randint(0, vocab, (2, 16)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if not cap.outputs:
        raise DerivationError("router never ran")
    return cap


def _logits_index(output: Any, logits: torch.Tensor) -> int | str | None:
    """Which element of the router output holds the logits (None: the output is them; 'none': not found)."""
    flat = logits.reshape(-1, logits.shape[-1])
    items = [output] if isinstance(output, torch.Tensor) else list(output)
    for i, item in enumerate(items):
        same_shape = (
            isinstance(item, torch.Tensor) and item.shape[-1] == flat.shape[-1] and item.numel() == flat.numel()
        )
        if same_shape and torch.allclose(item.reshape(flat.shape).double(), flat.double(), atol=1e-5):
            return None if isinstance(output, torch.Tensor) else i
    return "none"


def _rule_matches(rule: Routing, logits, bias, top_k, index, weights) -> bool:
    z = logits.double().reshape(-1, logits.shape[-1])
    scores = torch.sigmoid(z) if rule.score == "sigmoid" else torch.softmax(z, -1)
    select = {"scores+bias": scores, "logits+bias": z}.get(rule.select_on)
    select = scores if select is None else select + bias.double().reshape(-1)
    ours = select.topk(top_k, -1).indices
    got = index.reshape(ours.shape).long()
    if not torch.equal(ours.sort(-1).values, got.sort(-1).values):
        return False
    w = scores.gather(-1, got)
    if rule.renormalize:
        w = w / w.sum(-1, keepdim=True)
    theirs = weights.double().reshape(w.shape)
    scale = (theirs.sum() / w.sum()).item()  # a routed_scaling_factor multiplies all weights
    return scale > 0 and torch.allclose(w * scale, theirs, atol=1e-4, rtol=1e-3)


def _read_rule(model, structure: Structure, config, bias_path: str | None) -> tuple[Routing | None, int | None, str]:
    """The first candidate rule that reproduces the experts' inputs, the logits index, selection_from."""
    cap = _capture(model, structure, config.vocab_size)
    layer = model.get_submodule(f"{structure.layers}.{structure.moe_layers[-1]}")
    weight = layer.get_parameter(structure.router_weight)
    bias_name = structure.router_weight.rsplit(".", 1)[0] + ".bias"
    router_bias = dict(layer.named_parameters()).get(bias_name)
    x = cap.inputs[0].reshape(-1, weight.shape[1])
    logits = torch.nn.functional.linear(x.to(weight.dtype), weight, router_bias)
    position = _logits_index(cap.outputs[0], logits)
    if position == "none":
        raise DerivationError("router output holds no logits equal to its linear layer's")
    selection = "experts_args" if cap.selections else "router_scores"
    picked = cap.selections[0] if cap.selections else _scores_selection(cap.outputs[0], position)
    if picked is None:
        return None, position, selection
    index, weights = picked
    sel_bias = _buffer(layer, bias_path) if bias_path else torch.zeros(structure.n_experts)
    for rule in _candidates(bias_path is not None):
        if _rule_matches(rule, logits, sel_bias, index.shape[-1], index, weights):
            return rule, position, selection
    return None, position, selection


def _scores_selection(output: Any, position: int | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(index, weights) from a router that returns dense [T, E] scores, zero where not selected (Llama 4)."""
    if isinstance(output, torch.Tensor):
        return None
    for i, item in enumerate(output):
        if i != position and isinstance(item, torch.Tensor) and item.is_floating_point() and item.dim() >= 2:
            scores = item.reshape(-1, item.shape[-1])
            k = int((scores != 0).sum(-1).max())
            if 0 < k < scores.shape[-1]:
                index = scores.topk(k, -1).indices
                return index, scores.gather(-1, index)
    return None


def _buffer(layer: torch.nn.Module, path: str) -> torch.Tensor:
    named = dict(layer.named_buffers()) | dict(layer.named_parameters())
    if path not in named:  # saved under another name than in memory: the one [E] bias with the same last name
        last = path.rsplit(".", 1)[-1]
        path = next((n for n in named if n.rsplit(".", 1)[-1] == last), None)
        if path is None:
            raise DerivationError(f"selection bias {last!r} not found in memory")
    return named[path].detach()


def _candidates(with_bias: bool) -> list[Routing]:
    select = ("scores+bias", "logits+bias") if with_bias else ("scores",)
    return [
        Routing(score=score, select_on=on, renormalize=renorm)
        for on in select
        for score in ("softmax", "sigmoid")
        for renorm in (True, False)
    ]


def routing(
    config, structure: Structure, bias_path: str | None, group_key: str | None
) -> tuple[Routing | None, Any, str]:
    """The routing rule, read by running a tiny real model; renormalize tied to norm_topk_prob if it decides."""
    grouped = group_key is not None
    probe = with_value(config, group_key, 1) if group_key else config
    torch.manual_seed(0)
    model = build(probe, "cpu")
    _randomize(model)
    rule, position, selection = _read_rule(model, structure, probe, bias_path)
    if rule is not None and isinstance(probe.to_dict().get("norm_topk_prob"), bool):
        flipped = with_value(probe, "norm_topk_prob", not probe.to_dict()["norm_topk_prob"])
        torch.manual_seed(0)
        other = build(flipped, "cpu")
        _randomize(other)
        rule2, _, _ = _read_rule(other, structure, flipped, bias_path)
        if rule2 is not None and rule2.renormalize != rule.renormalize:
            rule = Routing(rule.score, rule.select_on, "norm_topk_prob", grouped)
    if rule is not None:
        rule = Routing(rule.score, rule.select_on, rule.renormalize, grouped)
    return rule, position, selection


def _randomize(model: torch.nn.Module) -> None:
    """Spread values so that routing choices are clear-cut (default init is near zero)."""
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if tensor.is_floating_point() and ("bias" in name or "gate" in name or "router" in name):
                tensor.normal_(0.0, 1.0)
