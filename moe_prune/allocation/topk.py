"""Per-layer top-k (`allocate --top-k search`, LExI-style, arXiv 2509.02753) on one loaded model.

A candidate is the experts each token uses per MoE layer, at most the layer's top-k. It runs on the
loaded original by setting each layer's routing top-k attributes (the integer attributes named in
`Adapter.runtime_top_k_attrs`, or like the family's top-k config field, e.g. `num_experts_per_tok`),
which transformers' blocks copy from the config when they are built. The ragged checkpoint builds each
layer's block from a config holding that layer's top-k (`checkpoint/modeling_moe_prune.py`; vLLM's plugin
the same way), so the masked original and the written checkpoint route alike. `LayerTopK.check` proves
on one forward pass that the family reads those attributes when it routes (each layer's torch.topk calls
counted before and after): a family that takes top-k from elsewhere is refused, never searched with a
change that does nothing.

The search (`greedy`): LExI's allocation of active experts by layer sensitivity, measured here with the
allocation objective instead of weight perturbation. Starting from every layer at its full top-k, it lowers,
one step at a time, the layer whose next step loses the least objective when lowered alone (the loss of each
(layer, top-k) is measured once, the sum of losses assumed additive, as LExI's per-layer profile does),
until the active experts fit the budget. Deterministic: ties go to the earlier layer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from moe_prune.allocation.search import Counts
from moe_prune.architectures.config import ModelConfig
from moe_prune.checkpoint.ragged import block_path
from moe_prune.errors import MoePruneError


def attribute_names(config: ModelConfig) -> set[str]:
    """Names a block's top-k attribute has: the adapter's (`runtime_top_k_attrs`, which `finetune --top-k`
    sets too), or the last part of the family's top-k config field."""
    return {*config.adapter.runtime_top_k_attrs, *(key.rsplit(".", 1)[-1] for key in config.adapter.top_k_keys)}


class LayerTopK:
    """The top-k attributes of every MoE layer of a loaded model, to run it with fewer experts per token."""

    def __init__(self, model: Any, config: ModelConfig, refusal: str) -> None:
        names = attribute_names(config)
        decoder = model.get_submodule(config.adapter.runtime_layers)
        paths = block_path(config.adapter)
        self.layers = list(config.moe_layers)
        self.decoder_layers = [decoder[layer] for layer in self.layers]
        self.owners: list[list[tuple[Any, str]]] = []
        self.full: list[int] = []
        for layer, module in zip(self.layers, self.decoder_layers, strict=True):
            found = [
                (sub, name)
                for path in (paths if isinstance(paths, list) else [paths])
                for sub in module.get_submodule(path).modules()
                for name, value in vars(sub).items()
                if name in names and isinstance(value, int) and not isinstance(value, bool)
            ]
            values = {getattr(owner, name) for owner, name in found}
            if len(values) != 1:
                raise MoePruneError(f"{refusal}: layer {layer} holds its top-k in no single module attribute")
            self.owners.append(found)
            self.full.append(values.pop())

    @contextmanager
    def reduced(self, top_k: Counts) -> Iterator[None]:
        """Run the model inside with `top_k[i]` experts per token in MoE layer `layers[i]`."""
        saved = [[(owner, name, getattr(owner, name)) for owner, name in found] for found in self.owners]
        try:
            for found, k in zip(self.owners, top_k, strict=True):
                for owner, name in found:
                    setattr(owner, name, k)
            yield
        finally:
            for entries in saved:
                for owner, name, value in entries:
                    setattr(owner, name, value)

    def check(self, run: Callable[[], Any], refusal: str) -> None:
        """Refuse unless lowering each layer's top-k attribute by one changes the k of its own torch.topk calls."""
        lowered = tuple(max(1, k - 1) for k in self.full)
        before = self._topk_calls(run)
        with self.reduced(lowered):
            after = self._topk_calls(run)
        for layer, full, low, old, new in zip(self.layers, self.full, lowered, before, after, strict=True):
            if low != full and not (new[low] > old[low] and new[full] < old[full]):
                raise MoePruneError(
                    f"{refusal}: layer {layer}'s routing does not read its top-k attribute "
                    f"(torch.topk calls {dict(old)} before, {dict(new)} after lowering it to {low})"
                )

    def _topk_calls(self, run: Callable[[], Any]) -> list[Counter[int]]:
        """Per MoE layer, how often torch.topk ran with each k during `run()`."""
        calls: list[Counter[int]] = [Counter() for _ in self.layers]
        current: list[int | None] = [None]
        hooks = []
        for i, module in enumerate(self.decoder_layers):
            hooks.append(module.register_forward_pre_hook(lambda *_, i=i: current.__setitem__(0, i)))
            hooks.append(module.register_forward_hook(lambda *_: current.__setitem__(0, None)))
        try:
            with _CountTopK(calls, current):
                run()
        finally:
            for hook in hooks:
                hook.remove()
        return calls


class _CountTopK(TorchFunctionMode):
    """Count the k of every torch.topk (function or method) inside the MoE layer being run."""

    def __init__(self, calls: list[Counter[int]], current: list[int | None]) -> None:
        super().__init__()
        self.calls, self.current = calls, current

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in (torch.topk, torch.Tensor.topk) and self.current[0] is not None:
            k = kwargs.get("k", args[1] if len(args) > 1 else None)
            if isinstance(k, int):
                self.calls[self.current[0]][k] += 1
        return func(*args, **kwargs)


def active_budget(full: Counts, searched: tuple[bool, ...], ratio: float) -> int:
    """Most experts per token, summed over the searched layers, that `--active-ratio` keeps (floor of the share)."""
    if not 0 < ratio < 1:
        raise MoePruneError(f"--active-ratio {ratio} must be in (0, 1): the share of active experts kept")
    total = sum(k for k, s in zip(full, searched, strict=True) if s)
    budget = int(ratio * total + 1e-9)
    layers = sum(searched)
    if budget < layers:
        raise MoePruneError(
            f"--active-ratio {ratio} keeps {budget} of {total} active experts, fewer than one in each of the "
            f"{layers} searched layers"
        )
    return budget


def greedy(
    full: Counts, searched: tuple[bool, ...], budget: int, loss: Callable[[int, int], float]
) -> tuple[Counts, list[tuple[int, int, float]]]:
    """Lower searched layers' top-k (least `loss(i, k)` increase first) until Σ top-k over them <= `budget`.

    `loss(i, k)`: the objective lost with layer i alone at top-k k (0 at its full top-k). Returns the top-ks
    and the steps taken as (layer index, new top-k, loss increase).
    """
    top_k = list(full)
    steps: list[tuple[int, int, float]] = []
    while sum(k for k, s in zip(top_k, searched, strict=True) if s) > budget:
        options = [
            (loss(i, top_k[i] - 1) - (loss(i, top_k[i]) if top_k[i] < full[i] else 0.0), i)
            for i, s in enumerate(searched)
            if s and top_k[i] > 1
        ]
        cost, index = min(options)
        top_k[index] -= 1
        steps.append((index, top_k[index], cost))
    return tuple(top_k), steps
