"""Score a candidate mask on the loaded original: dropped experts never routed, no checkpoint written.

Every router computes its logits with F.linear on its weight; a TorchFunctionMode sets the dropped
experts' columns of that output to -inf before the router's own softmax/sigmoid and top-k, so the kept
experts are chosen and weighted exactly as in the pruned model (the prune tests compare the pruned model
with this masked original). Routers that select on score + bias (`Adapter.selection_bias`) also get a
-inf bias entry for dropped experts while a candidate runs; the original values are restored after.
Router rows past the experts' (`router_tail`) are never masked.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from moe_prune.architectures.config import ModelConfig
from moe_prune.errors import MoePruneError


class _MaskRouterLogits(TorchFunctionMode):
    """Set dropped columns of a router weight's F.linear output to -inf (id(weight) -> dropped slots); `hits`
    counts the calls per weight, so a router that computes its logits some other way is found, layer by layer."""

    def __init__(self, dropped: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.dropped = dropped
        self.hits: Counter[int] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is torch.nn.functional.linear and len(args) > 1 and id(args[1]) in self.dropped:
            self.hits[id(args[1])] += 1
            slots = self.dropped[id(args[1])]
            if len(slots):
                out = out.index_fill(-1, slots.to(out.device), float("-inf"))
        return out


class RouterMasks:
    """The routers (and selection biases) of a loaded model, to run it with given experts dropped."""

    def __init__(self, model: Any, config: ModelConfig) -> None:
        adapter = config.adapter
        self.model = model
        self.layers = list(config.moe_layers)
        self.weights: list[torch.Tensor] = []
        self.biases: list[list[torch.Tensor]] = []
        for layer in self.layers:
            rows = config.experts_in_layer(layer) + config.router_tail
            block = model.get_submodule(f"{adapter.runtime_layers}.{layer}")
            router = block.get_submodule(adapter.runtime_router)
            found = [p for p in router.parameters() if p.dim() == 2 and p.shape[0] == rows]
            if len(found) != 1:
                raise MoePruneError(
                    f"layer {layer}: no single router weight with {rows} rows in {type(router).__name__}"
                )
            self.weights.append(found[0])
            self.biases.append(_selection_biases(block, adapter.runtime_router, adapter.selection_bias, rows))

    @contextmanager
    def dropped(self, drops: list[list[int]]) -> Iterator[None]:
        """Run the model inside with `drops[i]` (slots) excluded from routing in MoE layer `layers[i]`."""
        saved = [[b.detach().clone() for b in biases] for biases in self.biases]
        slots = {id(w): torch.tensor(d, dtype=torch.long) for w, d in zip(self.weights, drops, strict=True)}
        with torch.no_grad():
            for biases, d in zip(self.biases, drops, strict=True):
                for bias in biases:
                    bias[..., d] = float("-inf")
        mode = _MaskRouterLogits(slots)
        try:
            with mode:
                yield
        finally:
            with torch.no_grad():
                for biases, originals in zip(self.biases, saved, strict=True):
                    for bias, original in zip(biases, originals, strict=True):
                        bias.copy_(original)
        missed = [
            layer for layer, w, d in zip(self.layers, self.weights, drops, strict=True) if d and not mode.hits[id(w)]
        ]
        if missed:  # those layers ran unmasked: the candidate's score would be the original's there
            raise MoePruneError(
                f"MoE layers {missed}: the router weight never reached F.linear, so dropped experts could not be "
                "masked; this family's routers cannot be scored without a checkpoint"
            )


def _selection_biases(block: torch.nn.Module, router_path: str, key: str | None, rows: int) -> list[torch.Tensor]:
    """The selection-bias tensors (named like `Adapter.selection_bias`'s last part) beside the router."""
    if key is None:
        return []
    name = key.rsplit(".", 1)[-1]
    owner = block.get_submodule(router_path.rsplit(".", 1)[0]) if "." in router_path else block
    tensors = dict(owner.named_buffers()) | dict(owner.named_parameters())
    return [t for n, t in tensors.items() if n.rsplit(".", 1)[-1] == name and t.shape[-1] == rows]
