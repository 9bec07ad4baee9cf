"""Opt-in statistics that run EVERY expert on EVERY token, not only the tokens routed to it.

Per MoE layer, over all tokens x (routed or not): o_e(x) is expert e's unweighted output, h_e(x) its
intermediate activation (the input of its down projection), p_e(x) the router probability of the
`soft_counts` statistic (softmax, or sigmoid for sigmoid routers) and y(x) = sum_k w_k o_k(x) / sum_k w_k
the gate-weighted MEAN of the token's chosen experts' outputs (w_k the gates the model applied, so the
experts module's output is y(x) times the token's gate sum: exactly y for routers that renormalise, a
fixed multiple of it for scaled ones such as DeepSeek-V3's routed_scaling_factor):

  out_all_sum [E, H]     sum_x o_e(x)                  `profile --expert-outputs`: HC-SMoE's expert feature
                                                        (the mean output over all tokens; wazenmai/HC-SMoE,
                                                        hcsmoe/merging/grouping_mixtral.py,
                                                        `group_experts_by_clustering_output`)
  refit_hh    [E, I, I]  sum_x p_e(x) h_e(x) h_e(x)^T  `profile --refit-stats`: the normal equations of the
  refit_hy    [E, I, H]  sum_x p_e(x) h_e(x) y(x)^T    least-squares fit of e's down projection to y
                                                        (`merge --refit`, see `merging.refit`)

Both cost one extra pass of every expert over every token (E times the routed work), hence opt-in;
the refit sums hold E x I x (I + H) floats per layer. `out_all_sum` runs the experts module's own
forward (one expert at a time, weight 1), so it holds for every family whose experts take
(hidden, top_k_index, top_k_weights). The refit needs h, which the module computes internally: it is
recomputed from the module's weights through transformers' experts interface (`has_gate`,
`is_transposed`, `_apply_gate`, see transformers.integrations.moe), so experts with biases, a norm
after the expert, or a custom module are refused in one line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from moe_prune.errors import MoePruneError
from moe_prune.runtime.expert_chunks import expert_param

EXPERT_OUTPUT_FIELDS = ("out_all_sum",)
REFIT_FIELDS = ("refit_hh", "refit_hy")


def refit_refusal(module: torch.nn.Module) -> str | None:
    """Why the intermediate activations of this experts module cannot be recomputed, or None."""
    if not hasattr(module, "has_gate") or not hasattr(module, "down_proj"):
        return f"its experts module ({type(module).__name__}) is not built on transformers' experts interface"
    if getattr(module, "has_bias", False):
        return "its experts have biases (the refit fits the down projection without one)"
    if getattr(module, "has_post_expert_norm", False):
        return "its experts end in a norm, so their output is not linear in the down projection"
    return None


def intermediate_size(module: torch.nn.Module) -> int:
    """I: the width of the down projection's input."""
    down = module.down_proj
    return int(down.shape[-2] if module.is_transposed else down.shape[-1])


def intermediate(module: Any, x: torch.Tensor, expert: int) -> torch.Tensor:
    """[T, I] h_e(x): what expert `expert`'s down projection receives (transformers' batched_mm path)."""
    weight = expert_param(module, "gate_up_proj" if module.has_gate else "up_proj", expert)
    z = x @ weight if module.is_transposed else x @ weight.T
    return module._apply_gate(z) if module.has_gate else module.act_fn(z)


class ExpertPass:
    """The opt-in sums of every MoE layer (slot = index in the recorder's `layers`), float64 on the layer's device."""

    def __init__(self, counts: list[int], hidden: int, outputs: bool, refit: bool) -> None:
        self.counts, self.hidden = counts, hidden
        self.fields = (EXPERT_OUTPUT_FIELDS if outputs else ()) + (REFIT_FIELDS if refit else ())
        self.refit = refit
        self.intermediate: int | None = None
        self.sums: list[dict[str, torch.Tensor] | None] = [None] * len(counts)

    def check(self, module: torch.nn.Module, family: str, selection_from: str) -> None:
        """Refuse, before any forward pass, a layer these statistics cannot be computed for."""
        if selection_from != "experts_args":
            how = {"grouped": "only inside its MoE block, on rows grouped by expert"}.get(
                selection_from, "on router-scaled inputs"
            )
            raise MoePruneError(f"--expert-outputs/--refit-stats: {family} runs its experts {how}; not supported")
        if self.refit:
            reason = refit_refusal(module)
            if reason is not None:
                raise MoePruneError(f"--refit-stats: not supported for {family}: {reason}")
            self.intermediate = intermediate_size(module)

    def shapes(self, experts: int) -> dict[str, tuple[int, ...]]:
        inner = self.intermediate or 0
        shapes = {"out_all_sum": (experts, self.hidden), "refit_hh": (experts, inner, inner)}
        shapes["refit_hy"] = (experts, inner, self.hidden)
        return {name: shapes[name] for name in self.fields}

    def zeros(self, slot: int, device: torch.device) -> dict[str, torch.Tensor]:
        shapes = self.shapes(self.counts[slot])
        return {k: torch.zeros(s, dtype=torch.float64, device=device) for k, s in shapes.items()}

    def layer(self, slot: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The running sums of one layer, allocated on first use on the device it runs on."""
        sums = self.sums[slot]
        if sums is None:
            sums = self.sums[slot] = self.zeros(slot, device)
        return sums

    @torch.no_grad()
    def add(
        self, slot: int, module: Any, forward: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor, probs
    ) -> None:
        """One batch of one layer: x [T, H] the experts' input, y [T, H] the gate-weighted mean of the chosen
        experts' outputs, probs [T, E] float64."""
        sums = self.layer(slot, x.device)
        ones = torch.ones((x.shape[0], 1), dtype=x.dtype, device=x.device)
        target = y.double()
        for e in range(self.counts[slot]):
            if "out_all_sum" in sums:
                chosen = torch.full((x.shape[0], 1), e, dtype=torch.long, device=x.device)
                sums["out_all_sum"][e] += forward(x, chosen, ones).reshape(x.shape[0], -1).sum(0, dtype=torch.float64)
            if self.refit:
                h = intermediate(module, x, e).double()
                weighted = h * probs[:, e : e + 1].to(h.device)
                sums["refit_hh"][e] += weighted.T @ h
                sums["refit_hy"][e] += weighted.T @ target
