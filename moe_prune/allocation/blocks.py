"""Score a merge candidate on the loaded original: each layer's MoE block swapped for the merged one.

`merge` plans every layer on its own (clusters, averaging weights, refit from that layer's statistics), so
the block of layer L merged to k experts is the same whatever the other layers keep. Merging the whole
model once per count k (uniform `--keep k`) therefore yields every (layer, k) block a candidate can use;
a candidate runs the original with, in each searched layer, the block of its count swapped in. That is the
merged checkpoint `merge --keep ... LAYER=COUNT` would write, computed without writing one per candidate
(the attention, embeddings and norms are the original's in both). Memory: one merged copy of every
searched layer's block per count tried, about (E − top-k)/2 times the routed experts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from moe_prune.allocation.search import Counts
from moe_prune.architectures.config import ModelConfig
from moe_prune.checkpoint.ragged import block_path


class MergedBlocks:
    """The original's MoE blocks and, per count, the merged model's; `build(k)` loads the model merged to k."""

    def __init__(
        self, model: Any, config: ModelConfig, layers: tuple[int, ...], searched: tuple[bool, ...], build: Callable
    ) -> None:
        self.model, self.build = model, build
        self.layers, self.searched = layers, searched
        path = block_path(config.adapter)
        self.paths = path if isinstance(path, list) else [path]
        self.runtime_layers = config.adapter.runtime_layers
        self.decoder = model.get_submodule(self.runtime_layers)
        self.blocks: dict[int, dict[int, list[torch.nn.Module]]] = {}  # count -> layer -> modules
        self.built = 0  # merged models built so far

    def _owner(self, layer_module: torch.nn.Module, path: str) -> tuple[torch.nn.Module, str]:
        parent, _, name = path.rpartition(".")
        return (layer_module.get_submodule(parent) if parent else layer_module), name

    def _modules(self, decoder: Any, layer: int) -> list[torch.nn.Module]:
        return [getattr(*self._owner(decoder[layer], p)) for p in self.paths]

    def _merged(self, count: int) -> dict[int, list[torch.nn.Module]]:
        """The blocks of the model merged to `count` experts in every searched layer (built on first use)."""
        if count not in self.blocks:
            merged = self.build(count)
            decoder = merged.get_submodule(self.runtime_layers)
            self.blocks[count] = {
                layer: self._modules(decoder, layer)
                for layer, searched in zip(self.layers, self.searched, strict=True)
                if searched
            }
            self.built += 1
        return self.blocks[count]

    @contextmanager
    def swapped(self, counts: Counts) -> Iterator[None]:
        """Run the model inside with searched layer i's block(s) replaced by the block merged to `counts[i]`."""
        saved: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
        try:
            for layer, count, searched in zip(self.layers, counts, self.searched, strict=True):
                if not searched:
                    continue
                for path, module in zip(self.paths, self._merged(count)[layer], strict=True):
                    owner, name = self._owner(self.decoder[layer], path)
                    saved.append((owner, name, getattr(owner, name)))
                    setattr(owner, name, module)
            yield
        finally:
            for owner, name, original in reversed(saved):
                setattr(owner, name, original)
