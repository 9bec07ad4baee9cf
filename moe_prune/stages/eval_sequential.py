"""`eval --sequential`: perplexity and expert load one decoder layer at a time, for models larger than memory.

Why: whole-model eval holds every layer (6.8 layers' worth at Qwen3-30B-A3B shapes, issue #24). Here the
layer-by-layer loop of `profile --sequential` (`runtime.layer_pass` over `runtime.sequential.LayerwiseModel`) runs
every chunk through one decoder layer at a time, the hidden states of all chunks in a `HiddenBuffer` (spilled to a
memory-mapped file past `buffer_memory`); then the model's own forward, its layers stubbed to hand back
the buffer's rows, gives the logits, and the one NLL loop (`training.nll.nll_sum`) scores them. Same
chunks, same batches, same layers: the perplexity equals whole-model eval's to float rounding (the head pass
scores one window at a time). Held at once: one decoder layer and the hidden buffer, then the embeddings and
head with one window's logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from moe_prune.checkpoint.source import Checkpoint
from moe_prune.runtime.layer_pass import LayerPass
from moe_prune.runtime.routing import RoutingRecorder
from moe_prune.runtime.sequential import HiddenBuffer, LayerwiseModel
from moe_prune.training.nll import nll_sum


@torch.inference_mode()
def score(
    runtime: LayerwiseModel,
    ckpt: Checkpoint,
    chunks: torch.Tensor,
    batch_size: int,
    on_step: Callable[[int], None],
    buffer_memory: int | None = None,
) -> tuple[float, int, RoutingRecorder]:
    """(summed NLL, predictions, routing counts) of `chunks`; `on_step(done)` after each batch of each pass
    (1 embedding pass, one per decoder layer, 1 head pass: `batches x (layers + 2)` steps)."""
    batches = [slice(start, start + batch_size) for start in range(0, len(chunks), batch_size)]
    step = iter(range(1, len(batches) * (len(runtime.layers) + 2) + 1))
    with LayerPass(runtime, chunks, batches, buffer_memory) as layerwise:
        layerwise.embed(skip=(), after=lambda rows: on_step(next(step)))  # embeddings and head freed until the head
        with RoutingRecorder(runtime.model, ckpt.config) as recorder:
            for layer, block in layerwise.layers():
                layerwise.run(block, layer, after=lambda rows: on_step(next(step)))
        assert layerwise.buffer is not None
        total, count = _head_pass(runtime, ckpt, chunks, layerwise.buffer, lambda done: on_step(next(step)), batch_size)
    return total, count, recorder


def _head_pass(
    runtime: LayerwiseModel,
    ckpt: Checkpoint,
    chunks: torch.Tensor,
    buffer: HiddenBuffer,
    on_batch: Callable[[int], None],
    batch_size: int,
) -> tuple[float, int]:
    """The NLL of the last layer's hidden states, one window at a time: a batch's logits (and the loss's float32
    copies) are windows x seq_len x vocabulary, 1.2 GB for 4 x 256 tokens of a 152k vocabulary, more than a
    decoder layer's share. `on_batch` is still called once per batch of `batch_size` windows."""
    runtime.load_outside(skip=())  # a tied head is the embedding, loaded once
    single = [slice(row, row + 1) for row in range(len(chunks))]
    triples = ((chunks[rows], chunks[rows], chunks[rows][:, 1:].numel()) for rows in single)

    def window_done(done: int) -> None:
        if done % batch_size == 0 or done == len(chunks):
            on_batch(done)

    return nll_sum(_Head(runtime, buffer, iter(single)), triples, runtime.device, ckpt.folder, window_done)


class _Head:
    """What the NLL loop calls as the model: the batch's last-layer hidden states, read from the buffer in
    batch order, through the model's own final norm and head (`LayerwiseModel.finish`)."""

    def __init__(self, runtime: LayerwiseModel, buffer: HiddenBuffer, rows: Iterator[slice]) -> None:
        self.runtime, self.buffer, self.rows = runtime, buffer, rows

    def __call__(self, input_ids: torch.Tensor, use_cache: bool = False) -> Any:
        return self.runtime.finish(input_ids, self.buffer.tensor[next(self.rows)])
