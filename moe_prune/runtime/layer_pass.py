"""The one layer-by-layer loop of `profile --sequential`, `eval --sequential` and `merge --refit`'s pass.

A `LayerwiseModel` (`runtime.sequential`) loads one decoder layer at a time; this runs windows through it:
the embeddings once over every batch (each layer's call arguments recorded, the hidden states kept in a
`HiddenBuffer`, in memory or spilled to a memory-mapped file), then each decoder layer loaded, run over the
buffered hidden states batch by batch (its outputs replacing its inputs) and freed. Each caller keeps only its
own per-layer work: statistics hooks (profile), routing counts and the head pass (eval), the slots' sums and
solves (merge --refit).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from moe_prune.runtime.sequential import HiddenBuffer, LayerwiseModel


class LayerPass:
    """Windows through a `LayerwiseModel` one decoder layer at a time: the one loop of `profile --sequential`,
    `eval --sequential` and `merge --refit`'s pass, whose callers keep only their own per-layer work.

    `embed` runs the model's embeddings once over every batch (recording the hidden states into a `HiddenBuffer`,
    spilled to a memory-mapped file in `spill` past `buffer_memory` bytes, and what the model passes each layer);
    `layers` loads each decoder layer for the loop body and frees it after; `run` runs one layer over the buffered
    hidden states batch by batch, its outputs replacing its inputs. Used as a context manager, it frees the buffer.
    """

    def __init__(
        self,
        model: LayerwiseModel,
        windows: torch.Tensor,
        batches: list[slice],
        buffer_memory: int | None = None,
        spill: Path | None = None,
    ) -> None:
        self.model, self.windows, self.batches = model, windows, batches
        self.buffer_memory, self.spill = buffer_memory, spill
        self.buffer: HiddenBuffer | None = None
        # rows in a batch -> layer -> (the layer's call arguments after the hidden states, its keyword arguments)
        self.calls: dict[int, dict[int, tuple[tuple, dict]]] = {}

    def __enter__(self) -> LayerPass:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def embed(self, skip: tuple[str, ...], after: Callable[[slice], None] = lambda rows: None) -> None:
        """Every window's input to the first decoder layer; the parameters outside the layers (but `skip`) are
        loaded for it and freed after. `after(rows)` once each batch is buffered."""
        self.model.load_outside(skip=skip)
        for rows in self.batches:
            batch = self.windows[rows]
            inputs = self.model.layer_inputs(batch)
            hidden = inputs[0][0][0]
            if self.buffer is None:
                shape = (len(self.windows), *hidden.shape[1:])
                self.buffer = HiddenBuffer(shape, hidden.dtype, self.buffer_memory, self.spill)
            self.buffer.tensor[rows] = hidden.cpu()
            self.calls.setdefault(len(batch), {layer: (args[1:], kwargs) for layer, (args, kwargs) in inputs.items()})
            after(rows)
        self.model.free_outside()

    def layers(self, count: int | None = None) -> Iterator[tuple[int, torch.nn.Module]]:
        """(index, decoder layer) of the first `count` layers (None: all), each loaded for the loop body only."""
        for index in range(len(self.model.layers) if count is None else count):
            block = self.model.load_layer(index)
            yield index, block
            self.model.free_layer(index)

    def run(
        self,
        block: torch.nn.Module,
        index: int,
        batches: list[slice] | None = None,
        *,
        write: bool = True,
        before: Callable[[slice], None] = lambda rows: None,
        after: Callable[[slice], None] = lambda rows: None,
    ) -> None:
        """Decoder layer `index` over `batches` (None: all) of the buffered hidden states, its outputs replacing
        its inputs if `write`; `before(rows)` / `after(rows)` around each batch (hooks, progress)."""
        assert self.buffer is not None, "embed() first"
        for rows in self.batches if batches is None else batches:
            hidden = self.buffer.tensor[rows]
            args, kwargs = self.calls[len(hidden)][index]
            before(rows)
            out = block(hidden.to(self.model.device), *args, **kwargs)
            if write:
                self.buffer.tensor[rows] = (out[0] if isinstance(out, tuple) else out).cpu()
            after(rows)

    def close(self) -> None:
        if self.buffer is not None:
            self.buffer.close()
            self.buffer = None


def output_head(model: Any) -> tuple[str, ...]:
    """Module paths of the output head (a pass that needs only the decoder layers' outputs skips loading it)."""
    head = model.get_output_embeddings()
    return tuple(name + "." for name, module in model.named_modules() if module is head and name)
