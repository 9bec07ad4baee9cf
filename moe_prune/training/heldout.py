"""Held-out measurements for finetune's before/after table: loss, router entropy, expert load balance.

Every process scores the whole held-out set (it is small), so all processes agree without talking;
the model may be wrapped (DDP/FSDP): forwards go through the wrapper, hooks sit on the inner modules.
The loss is the mean NLL over the tokens that carry loss in training too: every next token of text chunks,
the response tokens of prompt/response examples (scored one example per forward, without padding).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moe_prune.architectures.config import ModelConfig
from moe_prune.runtime.routing import RoutingRecorder, load_balance
from moe_prune.training.batches import Sequences
from moe_prune.training.losses import RouterEntropy
from moe_prune.training.nll import Batch, nll_sum


@dataclass
class LayerBalance:
    """One MoE layer's top-k load: max/mean tokens per expert and normalised entropy H/log E."""

    layer: int
    max_over_mean: float
    entropy: float


@dataclass
class HeldOut:
    """What the held-out set says about the model at one point of the run."""

    loss: float  # mean next-token NLL (response tokens only for prompt/response data)
    router_entropy: float  # mean entropy (nats) of the routing distribution, see training.losses
    top_k: int
    load: list[LayerBalance]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def measure(
    model: Any,
    inner: Any,
    config: ModelConfig,
    data: Sequences,
    batch_size: int,
    top_k: int,
    device: Any,
    source: str | Path = "model",
) -> HeldOut:
    """Score `data` with `model` (possibly wrapped; `inner` is the unwrapped model the hooks go on).

    A non-finite loss is refused in one line naming `source`, as `eval` refuses it.
    """
    was_training = inner.training
    inner.eval()
    recorder = RoutingRecorder(inner, config)
    recorder.top_k = top_k
    entropies = []
    with recorder, RouterEntropy(inner, config) as entropy:

        def after_batch(_: int) -> None:
            entropies.append(float(entropy.mean()))
            entropy.clear()

        total, count = nll_sum(model, _batches(data, batch_size), device, source, after_batch)
    inner.train(was_training)
    load = [
        LayerBalance(layer, *load_balance(counts))
        for layer, counts in zip(recorder.layers, recorder.hard_counts.tolist(), strict=True)
    ]
    mean_entropy = sum(entropies) / len(entropies) if entropies else float("nan")
    return HeldOut(total / max(count, 1), mean_entropy, top_k, load)


def _batches(data: Sequences, batch_size: int) -> Iterator[Batch]:
    for index in data.eval_batches(batch_size):
        ids, targets, _ = data.batch(index)  # one unpadded example, or full chunks: no mask needed
        yield ids, targets, data.loss_tokens(index)
