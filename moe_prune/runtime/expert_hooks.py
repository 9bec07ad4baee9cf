"""How `runtime.statistics.StatisticsRecorder` sees every expert's unweighted output: its forward hooks.

How per-expert outputs are seen: for families whose experts module is called as
experts(hidden, top_k_index, top_k_weights) the module's forward is wrapped while recording. The
wrapper calls the module's ORIGINAL forward once, on one row per (token, chosen expert) sorted by
expert, with top-k = 1 and weight 1: it returns every expert's unweighted output computed by the
model's own code (activation, biases, clamps included) in one batched call; the statistics are
index-added per expert, then the outputs are weighted and index-added into the result per token.
Each expert runs once on its tokens, as without the recorder, so the model's output is unchanged
up to float summation order (tested).
llama4 (`selection_from == "router_scores"`) scales the expert INPUT by sigmoid(router logit) and runs
every expert on every token; its act_* statistics are of the experts-module output at each expert's
selected tokens, i.e. the expert output of its score-scaled input, and the routing weight is that
sigmoid score.

A mixin of the recorder (one job: these hooks; the recorder owns the sums they feed through
`_add_activations`, and the routing state `chosen`, `counts`, `adapter`, `_last_*`, `_pass`, `_modules`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


class ExpertOutputHooks:
    """The three ways per-expert outputs are seen; mixed into `StatisticsRecorder`, which defines what they read."""

    _add_activations: Callable[..., None]
    chosen: Callable[..., torch.Tensor]
    counts: list[int]
    adapter: Any
    _pass: Any
    _modules: list[torch.nn.Module | None]
    _last_probs: list[torch.Tensor | None]
    _last_gates: list[torch.Tensor | None]
    _last_index: list[torch.Tensor | None]
    _last_logits: list[torch.Tensor | None]

    def _experts_forward(
        self,
        slot: int,
        original: Callable[..., torch.Tensor],
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The experts module's forward on one row per (token, chosen expert), seeing every unweighted output.

        One call of the module's own forward with top-k = 1 and weight 1 over the rows sorted by
        expert computes each expert once on its tokens, as the model does; the outputs are then
        weighted and added per token in ascending expert order.
        """
        flat = hidden.reshape(-1, hidden.shape[-1])
        index = self.chosen(slot, top_k_index, top_k_weights).reshape(flat.shape[0], -1)
        weights = top_k_weights.reshape(index.shape)
        with torch.no_grad():
            experts = index.reshape(-1)
            order = torch.argsort(experts, stable=True)
            order = order[(experts[order] >= 0) & (experts[order] < self.counts[slot])]
            token = order // index.shape[1]
            chosen = experts[order]
        n = token.numel()
        picks, ones = chosen[:, None], torch.ones((n, 1), dtype=weights.dtype, device=weights.device)
        if self.adapter.tail_experts:  # longcat's experts fail on top-1 (squeeze): add its first identity expert, x0
            picks = torch.cat([picks, torch.full_like(picks, self.counts[slot])], dim=1)
            ones = torch.cat([ones, torch.zeros_like(ones)], dim=1)
        output = original(flat[token], picks, ones, *args, **kwargs).reshape(n, flat.shape[-1])  # n may be 0
        weight = weights.reshape(-1)[order]
        gate = (weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)).reshape(-1)
        self._add_activations(slot, chosen, output.detach(), weight.detach(), gate[order].detach())
        weighted = output.mul_(weight[:, None]) if not torch.is_grad_enabled() else output * weight[:, None]
        result = torch.zeros_like(flat).index_add_(0, token, weighted.to(flat.dtype))  # in place: no copy
        if self._pass is not None:  # the refit's target: the gate-weighted mean of the chosen experts' outputs
            chosen_weights = weights.detach().double() * ((index >= 0) & (index < self.counts[slot]))
            mean = result.detach().double() / chosen_weights.sum(1, keepdim=True).clamp_min(1e-30)
            self._pass.add(slot, self._modules[slot], original, flat.detach(), mean, self._last_probs[slot])
        if self.adapter.tail_experts:
            result = self._add_tail_picks(slot, original, flat, index, weights, result, *args, **kwargs)
        return result.reshape(hidden.shape[:-1] + result.shape[-1:])

    def _add_tail_picks(self, slot: int, original, flat, index, weights, result, *args, **kwargs) -> torch.Tensor:
        """`result` plus the weighted outputs of picks past the layer's experts (longcat's identity zero experts),
        which are no expert's statistics but part of the model's output."""
        token, column = (index >= self.counts[slot]).nonzero(as_tuple=True)
        if token.numel() == 0:
            return result
        picks = index[token, column][:, None].repeat(1, 2)  # top-1 fails in longcat's experts: the same pick, x0
        picked = weights[token, column][:, None]
        output = original(flat[token], picks, torch.cat([picked, torch.zeros_like(picked)], dim=1), *args, **kwargs)
        return result.index_add(0, token, output.reshape(token.numel(), -1).to(result.dtype))

    def _gates_hook(self, slot: int, module: torch.nn.Module, args: Sequence[Any], output: Any) -> None:
        self._last_gates[slot] = output[2]  # jetmoe: the gates of the routed rows, in the grouped order

    @torch.no_grad()
    def _grouped_outputs_hook(self, slot: int, module: torch.nn.Module, args: Sequence[Any], output: Any) -> None:
        """jetmoe: every routed row's output before its gate, grouped by expert in ascending order (args[1]: rows per
        expert); its gates are softmax over the token's top-k, so the applied weight is the renormalised gate."""
        gates = self._last_gates[slot]
        if gates is None:
            raise RuntimeError("statistics recorder: experts ran before their router")
        sizes = torch.as_tensor(args[1], device=output.device)
        expert = torch.repeat_interleave(torch.arange(sizes.numel(), device=output.device), sizes)
        self._add_activations(slot, expert, output.detach(), gates.detach(), gates.detach())

    @torch.no_grad()
    def _scaled_experts_hook(self, slot: int, module: torch.nn.Module, args: Sequence[Any], output: Any) -> None:
        """llama4: the experts module returns [E*T, H] for score-scaled copies of every token."""
        index, logits = self._last_index[slot], self._last_logits[slot]
        if index is None or logits is None:
            raise RuntimeError("statistics recorder: experts ran before their router")
        per_expert = output.detach().reshape(self.counts[slot], index.shape[0], -1)
        top_k_sum = torch.sigmoid(logits.gather(1, index)).sum(dim=1)  # the gates of each token's chosen experts
        for expert in torch.unique(index).tolist():
            token = (index == expert).any(dim=1).nonzero(as_tuple=True)[0]
            chosen = torch.full_like(token, expert)
            score = torch.sigmoid(logits[token, expert])
            self._add_activations(slot, chosen, per_expert[expert, token], score, score / top_k_sum[token])
