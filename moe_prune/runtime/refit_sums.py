"""The normal equations of `merge --refit` for ONE MoE layer and only the experts that become slots (anchors).

`profile --refit-stats` (`runtime.expert_outputs.ExpertPass`) keeps, for every expert of every layer,

    hh_e = sum_x p_e(x) h_e(x) h_e(x)^T  [I, I]      hy_e = sum_x p_e(x) h_e(x) y(x)^T  [I, H]

(E x I x (I + H) float64 per layer, 2.2 GB for one Qwen3-30B-A3B layer, all layers kept at once). The
sequential refit (`merging.refit_pass`) needs them for one layer at a time and for the D anchors the
merge keeps, so this recorder hooks one layer, sums the same quantities for those anchors and is dropped
once the layer is solved: D x I x (I + H) floats alive, never the model's.

The same definitions as `ExpertPass`: p the router probability (softmax, or sigmoid for sigmoid routers),
h_e recomputed from the experts module's weights (`expert_outputs.intermediate`), y the gate-weighted
MEAN of the token's chosen experts' outputs, here the experts module's own output divided by the token's
gate sum over real experts (picks past the layer's experts, such as longcat's identity experts, are
rerun with weight 0 so they are no part of y). On the CPU the sums are numpy arrays (seen by tracemalloc,
which the memory test reads) updated in place through torch views.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from moe_prune.architectures.config import ModelConfig
from moe_prune.errors import MoePruneError
from moe_prune.runtime.expert_outputs import intermediate, intermediate_size, refit_refusal
from moe_prune.runtime.routing import RoutingRecorder


def refit_check(module: torch.nn.Module, config: ModelConfig, layer: int) -> None:
    """Refuse, before any forward pass, a layer whose refit sums cannot be recomputed (works on the meta skeleton)."""
    family = config.model_type
    if config.adapter.selection_from != "experts_args":
        raise MoePruneError(f"--refit: {family} does not hand its experts the token's choice; not supported")
    reason = refit_refusal(module)
    if reason is not None:
        raise MoePruneError(f"--refit: not supported for {family} (MoE layer {layer}): {reason}")
    if config.adapter.expert_vectors:
        vectors = ", ".join(config.adapter.expert_vectors)
        raise MoePruneError(
            f"--refit: {family} (MoE layer {layer}) scales each expert's output by {vectors}, "
            "which the down projection fit leaves out; merge without --refit"
        )


def hidden_size(model: Any) -> int:
    """H: the model's hidden size (of the text model for multimodal configs)."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(text.hidden_size)


def slot_bytes(model: Any, experts: torch.nn.Module) -> int:
    """float64 bytes of one slot's sums, hh [I, I] and hy [I, H] (works on the meta skeleton): the unit of
    `merge --refit-memory`."""
    inner = intermediate_size(experts)
    return inner * (inner + hidden_size(model)) * 8


def zeros(shape: tuple[int, ...], device: torch.device) -> tuple[np.ndarray | None, torch.Tensor]:
    """float64 zeros: a numpy array and its torch view on the CPU, a device tensor elsewhere."""
    if device.type == "cpu":
        array = np.zeros(shape, dtype=np.float64)
        return array, torch.from_numpy(array)
    return None, torch.zeros(shape, dtype=torch.float64, device=device)


class AnchorSums(RoutingRecorder):
    """Context manager on MoE layer `layer`: while active, add hh and hy of the experts `anchors` (original slots).

    `scorer`, when set, receives (row, h, p, y) for each anchor instead of the sums being added: the
    held-out phase of the ridge choice (`merging.refit_pass`).
    """

    def __init__(self, model: Any, config: ModelConfig, layer: int, anchors: Sequence[int]) -> None:
        super().__init__(model, config)
        self.layer, self.anchors = layer, list(anchors)
        self.slot = self.layers.index(layer)
        self.experts = self.module(layer, self.adapter.runtime_experts)
        refit_check(self.experts, config, layer)
        self.inner = intermediate_size(self.experts)
        self.hidden = hidden_size(model)
        self.hh: torch.Tensor | None = None
        self.hy: torch.Tensor | None = None
        self.arrays: dict[str, np.ndarray | None] = {}
        self.scorer: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None
        self._probs: torch.Tensor | None = None
        self._previous: Any = None

    def __enter__(self) -> AnchorSums:
        router = self.module(self.layer, self.adapter.runtime_router)
        self._handles.append(router.register_forward_hook(partial(self._router_hook, self.slot)))
        self._previous = self.experts.__dict__.get("forward")
        self.experts.forward = partial(self._experts_forward, self.experts.forward)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is None:
            del self.experts.forward
        else:
            self.experts.forward = self._previous
        super().__exit__(*exc)

    @torch.no_grad()
    def on_router_logits(self, slot: int, logits: torch.Tensor) -> None:
        z = logits.detach().reshape(-1, logits.shape[-1]).double()
        self._probs = torch.sigmoid(z) if self.adapter.routing.score == "sigmoid" else torch.softmax(z, dim=-1)

    def _experts_forward(
        self, original: Callable[..., torch.Tensor], hidden: torch.Tensor, top_k_index, top_k_weights, *args, **kwargs
    ) -> torch.Tensor:
        out = original(hidden, top_k_index, top_k_weights, *args, **kwargs)
        with torch.no_grad():
            flat = hidden.detach().reshape(-1, hidden.shape[-1])
            index = self.chosen(self.slot, top_k_index, top_k_weights).reshape(flat.shape[0], -1)
            weights = top_k_weights.detach().reshape(index.shape)
            real = (index >= 0) & (index < self.counts[self.slot])
            base = out
            if not bool(real.all()):  # picks past the experts (identity/skip experts) are no part of y
                masked = (weights * real).reshape(top_k_weights.shape)
                base = original(hidden, top_k_index, masked, *args, **kwargs)
            total = (weights.double() * real).sum(1, keepdim=True).clamp_min(1e-30)
            self.add(flat, base.detach().reshape(flat.shape).double() / total)
        return out

    @torch.no_grad()
    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One batch: x [T, H] the experts' input, y [T, H] the gate-weighted mean of the chosen outputs."""
        probs = self._probs
        if probs is None or probs.shape[0] != x.shape[0]:
            raise RuntimeError("refit sums: experts ran before their router")
        if self.hh is None and self.scorer is None:
            count = len(self.anchors)
            self.arrays["hh"], self.hh = zeros((count, self.inner, self.inner), x.device)
            self.arrays["hy"], self.hy = zeros((count, self.inner, self.hidden), x.device)
        for row, expert in enumerate(self.anchors):
            h = intermediate(self.experts, x, expert).double()
            p = probs[:, expert : expert + 1].to(h.device)
            if self.scorer is not None:
                self.scorer(row, h, p, y)
                continue
            assert self.hh is not None and self.hy is not None
            weighted = h * p
            self.hh[row] += weighted.T @ h
            self.hy[row] += weighted.T @ y

    def release(self) -> None:
        """Drop the sums (the layer is solved)."""
        self.hh = self.hy = None
        self.arrays.clear()
