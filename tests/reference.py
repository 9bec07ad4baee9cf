"""An independent path to a pruned model's output: the original model with experts masked out of routing.

Dropped experts get -inf router logits (intercepting the router's linear layer with a
TorchFunctionMode, so no routing code of ours is involved) and, for routers that select on
score + bias, a -inf selection bias. Router rows past the experts' (`Adapter.router_tail`, e.g.
inkling_text's shared-expert rows) are never masked: only columns of dropped experts are.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from moe_prune.architectures.spec import Adapter


def router_weight(module: torch.nn.Module, n_experts: int) -> torch.nn.Parameter:
    """The [E, H] parameter of a router module (its name differs per family); E counts any rows past the experts'."""
    for param in module.parameters():
        if param.dim() == 2 and param.shape[0] == n_experts:
            return param
    raise AssertionError(f"no router weight in {type(module).__name__}")


class MaskRouterLogits(TorchFunctionMode):
    """Set the logits of dropped experts to -inf wherever a router weight feeds F.linear."""

    def __init__(self, dropped: dict[int, list[int]]) -> None:  # id(weight) -> dropped columns
        super().__init__()
        self.dropped = dropped
        self.hits = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.nn.functional.linear and len(args) > 1 and id(args[1]) in self.dropped:
            self.hits += 1
            out = out.clone()
            out[..., self.dropped[id(args[1])]] = float("-inf")
        return out


@torch.no_grad()
def masked_logits(model, adapter: Adapter, n_experts: int, drop_slots: dict[int, list[int]], input_ids):
    """Logits of `model` with `drop_slots[layer]` excluded from routing in every MoE layer."""
    tail = adapter.router_tail  # rows past the experts': a count, or the config key holding it
    rows = n_experts + (getattr(model.config.get_text_config(), tail) if isinstance(tail, str) else tail)
    dropped = {}
    for layer, slots in drop_slots.items():
        block = model.get_submodule(f"{adapter.runtime_layers}.{layer}")
        router = block.get_submodule(adapter.runtime_router)
        dropped[id(router_weight(router, rows))] = slots
        for key in adapter.lockstep:  # a second expert set's router (jetmoe's attention experts) drops them too
            param = block.get_parameter(key)
            if param.dim() == 2:
                dropped[id(param)] = slots
        if adapter.selection_bias:
            owner = block.get_submodule(adapter.runtime_router.rsplit(".", 1)[0])
            for name, buf in list(owner.named_buffers()) + list(owner.named_parameters()):
                if buf.shape[-1] in (n_experts, rows) and buf.dim() <= 2 and "bias" in name:
                    buf.data[..., slots] = float("-inf")
    mode = MaskRouterLogits(dropped)
    with mode:
        logits = model(input_ids).logits
    assert mode.hits >= len(drop_slots), f"router linear intercepted {mode.hits} times for {len(drop_slots)} layers"
    return logits
