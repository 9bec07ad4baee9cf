"""Score a merge candidate on the loaded original: each layer's MoE block swapped for the merged one.

`merge` plans every layer on its own (clusters, averaging weights, refit from that layer's statistics), so
the block of layer L merged to k experts is the same whatever the other layers keep. Merging the whole
model once per count k (uniform `--keep k`) therefore yields every (layer, k) block a candidate can use;
a candidate runs the original with, in each searched layer, the block of its count swapped in. That is the
merged checkpoint `merge --keep ... LAYER=COUNT` would write, computed without writing one per candidate
(the attention, embeddings and norms are the original's in both).

Memory: only what the candidate being measured uses. Before each candidate, the blocks it does not use are
dropped (and collected: a loaded transformers model sits in reference cycles, so without `gc.collect` it
would linger until a full collection); then `build(k, layers)` merges only the layers that now need a
block of count k. So the search holds at most one merged block per searched layer beside the original
(plus, while one is built, that merged model), whatever the number of candidates or counts it tries.
Neighbouring candidates differ in two layers, so a step rebuilds those layers only.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from moe_prune.allocation.search import Counts
from moe_prune.architectures.config import ModelConfig
from moe_prune.checkpoint.ragged import block_path


class MergedBlocks:
    """The original's MoE blocks and the current candidate's merged ones; `build(k, layers)` loads a model whose
    `layers` are merged to k."""

    def __init__(
        self, model: Any, config: ModelConfig, layers: tuple[int, ...], searched: tuple[bool, ...], build: Callable
    ) -> None:
        self.model, self.build = model, build
        self.layers, self.searched = layers, searched
        path = block_path(config.adapter)
        self.paths = path if isinstance(path, list) else [path]
        self.runtime_layers = config.adapter.runtime_layers
        self.decoder = model.get_submodule(self.runtime_layers)
        self.blocks: dict[int, dict[int, list[torch.nn.Module]]] = {}  # count -> layer -> modules (held now)
        self.built = 0  # merged models built so far (a layer dropped and needed again is rebuilt)

    def _owner(self, layer_module: torch.nn.Module, path: str) -> tuple[torch.nn.Module, str]:
        parent, _, name = path.rpartition(".")
        return (layer_module.get_submodule(parent) if parent else layer_module), name

    def _modules(self, decoder: Any, layer: int) -> list[torch.nn.Module]:
        return [getattr(*self._owner(decoder[layer], p)) for p in self.paths]

    def _keep_only(self, wanted: dict[int, int]) -> None:
        """Drop every merged block but the (layer -> count) ones in `wanted`, and collect the freed models."""
        dropped = False
        for count in list(self.blocks):
            for layer in [layer for layer in self.blocks[count] if wanted.get(layer) != count]:
                del self.blocks[count][layer]
                dropped = True
            if not self.blocks[count]:
                del self.blocks[count]
        if dropped:
            gc.collect()

    def _merged(self, count: int, layers: list[int]) -> dict[int, list[torch.nn.Module]]:
        """The blocks merged to `count` experts of `layers` (the model merged to it built for the missing ones)."""
        held = self.blocks.setdefault(count, {})
        missing = [layer for layer in layers if layer not in held]
        if missing:
            merged = self.build(count, missing)
            decoder = merged.get_submodule(self.runtime_layers)
            held.update({layer: self._modules(decoder, layer) for layer in missing})
            del merged, decoder
            gc.collect()  # the rest of the merged model (attention, embeddings) goes now, not at a full collection
            self.built += 1
        return held

    @contextmanager
    def swapped(self, counts: Counts) -> Iterator[None]:
        """Run the model inside with searched layer i's block(s) replaced by the block merged to `counts[i]`."""
        saved: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
        wanted = {layer: count for layer, count, searched in zip(self.layers, counts, self.searched, strict=True)
                  if searched}  # fmt: skip
        self._keep_only(wanted)
        try:
            for layer, count in wanted.items():
                needing = [other for other, n in wanted.items() if n == count]
                for path, module in zip(self.paths, self._merged(count, needing)[layer], strict=True):
                    owner, name = self._owner(self.decoder[layer], path)
                    saved.append((owner, name, getattr(owner, name)))
                    setattr(owner, name, module)
            yield
        finally:
            for owner, name, original in reversed(saved):
                setattr(owner, name, original)
