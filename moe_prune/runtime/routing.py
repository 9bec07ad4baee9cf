"""Watch a loaded MoE model route tokens: forward hooks on every MoE layer, through the adapter's data.

Every family exposes the same two modules per MoE layer (`Adapter.runtime_router`,
`Adapter.runtime_experts`); the adapter says where the top-k choice can be read:
  experts_args   the experts module is called as experts(hidden, top_k_index, top_k_weights),
                 so a forward pre-hook sees the choice exactly as the model made it;
  router_scores  the router returns dense scores and logits (llama4): the choice is the top-k of
                 the logits (with config top-k), the same ranking the router uses;
  grouped        the same choice (jetmoe's router ranks logits); expert outputs are read where the
                 family computes them grouped by expert (`Adapter.grouped_outputs`).

Statistics are streaming sums kept on the model's device (one `bincount` per layer call, no sync),
so memory does not grow with the number of tokens. A later stage adds statistics by subclassing
`RoutingRecorder` and extending `on_selection` / `on_router_logits` (e.g. soft counts, logit Grams).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch

from moe_prune.architectures.config import ModelConfig


def router_logits(output: Any, index: int | None) -> torch.Tensor:
    """The [T, E] logits in a router module's output (`Adapter.router_logits_output`)."""
    return output if index is None else output[index]


class RoutingRecorder:
    """Context manager: while active, count each expert's top-k selections per MoE layer.

    `tokens[i]` and `hard_counts[i]` belong to MoE layer `layers[i]` (the `artifacts.stats` layout).
    """

    def __init__(self, model: Any, config: ModelConfig) -> None:
        self.model = model
        self.config = config
        self.adapter = config.adapter
        self.layers: list[int] = config.moe_layers
        self.num_experts = config.num_experts  # the largest count: statistics arrays are padded to it
        self.counts = [config.experts_per_layer[layer] for layer in self.layers]  # each layer's own (ragged)
        self.top_k = config.top_k
        self._tokens = [0] * len(self.layers)
        self._counts: list[torch.Tensor | None] = [None] * len(self.layers)
        self._handles: list[Any] = []

    def module(self, layer: int, path: str) -> torch.nn.Module:
        """A submodule of decoder layer `layer`, e.g. its router (`adapter.runtime_router`)."""
        return self.model.get_submodule(f"{self.adapter.runtime_layers}.{layer}.{path}")

    def __enter__(self) -> RoutingRecorder:
        adapter = self.adapter
        for slot, layer in enumerate(self.layers):
            router = self.module(layer, adapter.runtime_router)
            self._handles.append(router.register_forward_hook(partial(self._router_hook, slot)))
            if adapter.selection_from == "experts_args":
                experts = self.module(layer, adapter.runtime_experts)
                self._handles.append(experts.register_forward_pre_hook(partial(self._experts_hook, slot)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _router_hook(self, slot: int, module: torch.nn.Module, args: Sequence[Any], output: Any) -> None:
        logits = router_logits(output, self.adapter.router_logits_output)
        if self.adapter.router_tail:  # columns past the experts' (Adapter.router_tail) are no expert's
            logits = logits[..., : self.counts[slot]]
        self.on_router_logits(slot, logits)
        if self.adapter.selection_from in ("router_scores", "grouped"):
            self.on_selection(slot, logits.topk(self.top_k, dim=-1).indices)

    def _experts_hook(self, slot: int, module: torch.nn.Module, args: Sequence[Any]) -> None:
        self.on_selection(slot, self.chosen(slot, args[1], args[2]))

    def chosen(self, slot: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """The experts' top_k_index, with picks of router rows past the experts' that the family hands over as
        expert 0 with weight 0 (`Adapter.tail_picks_masked`, zaya's skip expert) set to the layer's expert count:
        no expert's."""
        if not self.adapter.tail_picks_masked:
            return top_k_index
        weights = top_k_weights.reshape(top_k_index.shape)
        return top_k_index.masked_fill((top_k_index == 0) & (weights == 0), self.counts[slot])

    def on_router_logits(self, slot: int, logits: torch.Tensor) -> None:
        """[T, E] router logits of MoE layer `layers[slot]`; nothing to do for plain counting."""

    def on_selection(self, slot: int, top_k_index: torch.Tensor) -> None:
        """[T, k] chosen experts of MoE layer `layers[slot]`: add one count per choice (of an expert: an index
        from the layer's expert count on is a router row past the experts', e.g. a skip or identity expert)."""
        index = top_k_index.reshape(-1)
        counts = torch.bincount(index[index < self.counts[slot]], minlength=self.num_experts)
        previous = self._counts[slot]
        self._counts[slot] = counts if previous is None else previous + counts
        self._tokens[slot] += top_k_index.shape[0]

    @property
    def tokens(self) -> torch.Tensor:
        """int64 [n_moe_layers]: tokens routed through each MoE layer."""
        return torch.tensor(self._tokens, dtype=torch.int64)

    @property
    def hard_counts(self) -> torch.Tensor:
        """int64 [n_moe_layers, E]: top-k selections of each expert (tokens × top-k a layer, less skip picks)."""
        rows = [torch.zeros(self.num_experts, dtype=torch.int64) if c is None else c.cpu() for c in self._counts]
        return torch.stack(rows).to(torch.int64) if rows else torch.zeros(0, self.num_experts, dtype=torch.int64)


def load_balance(counts: Sequence[int] | torch.Tensor) -> tuple[float, float]:
    """(max/mean, H/log E) of one layer's expert load: 1.0 and 1.0 are perfectly balanced.

    max/mean says how much busier the busiest expert is than average (E for one expert taking
    everything); the normalised entropy is 0 when one expert takes all tokens. NaN with no tokens.
    """
    load = torch.as_tensor(counts, dtype=torch.float64).flatten()
    total = float(load.sum())
    if total <= 0 or load.numel() == 0:
        return math.nan, math.nan
    if load.numel() == 1:
        return 1.0, 1.0
    p = load / total
    nonzero = p[p > 0]
    entropy = float(-(nonzero * nonzero.log()).sum())
    return float(load.max()) / (total / load.numel()), entropy / math.log(load.numel())
