"""Training losses beyond next-token cross-entropy: the router entropy penalty (SEER-MoE, section 3.3.2).

Entropy of one token's routing distribution p over the E experts: H = -sum_e p_e log p_e, where
p = softmax(logits) for softmax routers and p = sigmoid(logits) / sum(sigmoid(logits)) for sigmoid
routers (their scores are independent gates, not a distribution, so they are normalised to one to
measure how decisive the routing is). The penalty is the mean of H over tokens and MoE layers.
Router logits are captured by forward hooks on `Adapter.runtime_router`, keeping the autograd graph.
With padded batches (`finetune --format chat|completion`) `RouterEntropy.mask` leaves padding tokens out.
"""

from __future__ import annotations

from typing import Any

import torch

from moe_prune.architectures.config import ModelConfig
from moe_prune.runtime.routing import router_logits


def token_cross_entropy(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token NLL of a [B, T] batch (position t predicts token t + 1), in float32: the one definition
    that eval, profile --gradients, finetune and its held-out measure all use; `reduction` "mean" or "sum".

    `ids` may be labels: a target of -100 (`training.batches.IGNORE`) carries no loss and is not counted
    by "mean" (prompt and padding tokens of `finetune --format chat|completion`)."""
    targets = ids[:, 1:].reshape(-1)
    predicted = logits[:, :-1].reshape(targets.numel(), -1).float()
    return torch.nn.functional.cross_entropy(predicted, targets, reduction=reduction)


def routing_entropy(logits: torch.Tensor, score: str) -> torch.Tensor:
    """[T] entropy (nats) of each token's routing distribution (see the module docstring)."""
    logits = logits.float()
    if score == "sigmoid":
        gates = torch.sigmoid(logits)
        probs = gates / gates.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(gates.dtype).tiny)
        log_probs = torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))
    else:
        log_probs = torch.log_softmax(logits, dim=-1)
        probs = log_probs.exp()
    return -(probs * log_probs).sum(dim=-1)


class RouterEntropy:
    """Context manager: collects each MoE layer's router logits of the forwards run inside it.

    `mean()` is the penalty of everything collected since the last `clear()`; the graph is kept so
    the penalty can be backpropagated.
    """

    def __init__(self, model: Any, config: ModelConfig) -> None:
        self.model = model
        self.config = config
        self._entropies: list[torch.Tensor] = []
        self._handles: list[Any] = []
        # [B * T] bool of the next forward's real tokens (None: all are real). A router that sees another
        # number of rows than the batch has tokens (none known) is measured over all its rows.
        self.mask: torch.Tensor | None = None

    def __enter__(self) -> RouterEntropy:
        adapter = self.config.adapter
        for layer in self.config.moe_layers:
            router = self.model.get_submodule(f"{adapter.runtime_layers}.{layer}.{adapter.runtime_router}")
            self._handles.append(router.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        adapter = self.config.adapter
        logits = router_logits(output, adapter.router_logits_output)
        logits = logits.reshape(-1, logits.shape[-1])
        if self.mask is not None and self.mask.numel() == logits.shape[0]:
            logits = logits[self.mask.to(logits.device)]
        self._entropies.append(routing_entropy(logits, adapter.routing.score).mean())

    def mean(self) -> torch.Tensor:
        """Mean entropy over the layers (each layer's mean over its tokens); 0 when nothing ran."""
        if not self._entropies:
            return torch.zeros(())
        return torch.stack(self._entropies).mean()

    def clear(self) -> None:
        self._entropies.clear()
