"""Score a merge candidate on the loaded original: each layer's MoE block swapped for the merged one.

`merge` plans every layer on its own (clusters, averaging weights, refit from that layer's statistics), so
the block of layer L merged to k experts is the same whatever the other layers keep. Merging the model to
count k (uniform `--keep k`) therefore yields every (layer, k) block a candidate can use; a candidate runs
the original with, in each searched layer, the block of its count swapped in. That is the merged checkpoint
`merge --keep ... LAYER=COUNT` would write, computed without writing one per candidate (the attention,
embeddings and norms are the original's in both).

Memory: one merged block per searched layer beside the original (plus, while one is built, that merged
model), whatever the number of candidates or counts the search tries. Before each candidate, the blocks it
does not use are spilled (`allocation.spill`: tensors to a safetensors file in a private temporary folder,
storage freed); a block needed again is restored from its file. Builds: one per count, at its first use:
`build(k, layers)` merges every searched layer to k, the candidate's layers are kept and the others spilled
at once. Hill climbing keeps coming back to the blocks it just put aside (a rejected neighbour, then another
neighbour of the same candidate), and a build is a whole `merge.run` (a checkpoint written and loaded, with
`--refit` and no stored sums a layer-by-layer pass), so rebuilding them instead cost about 16 times the
builds. Disk: each (count, layer) block at most once, removed when the search ends (`close`, or leaving the
`with` block). A block whose tensors are spread over several devices or held by an offload hook (on meta)
cannot be spilled with one `to_empty`; it stays in memory rather than be built again.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from moe_prune.allocation import spill
from moe_prune.allocation.search import Counts
from moe_prune.architectures.config import ModelConfig
from moe_prune.checkpoint.ragged import block_path

Key = tuple[int, int]  # (count, layer)


class MergedBlocks:
    """The original's MoE blocks and every merged one built so far (held, or spilled to disk);
    `build(k, layers)` loads a model whose `layers` are merged to k. Use it in a `with` block: leaving it
    deletes the spill folder."""

    def __init__(
        self, model: Any, config: ModelConfig, layers: tuple[int, ...], searched: tuple[bool, ...], build: Callable
    ) -> None:
        self.model, self.build = model, build
        self.layers, self.searched = layers, searched
        path = block_path(config.adapter)
        self.paths = path if isinstance(path, list) else [path]
        self.runtime_layers = config.adapter.runtime_layers
        self.decoder = model.get_submodule(self.runtime_layers)
        self.blocks: dict[Key, list[torch.nn.Module]] = {}  # every block built: held, or spilled (on meta)
        self.spilled: dict[Key, torch.device] = {}  # the spilled blocks -> the device they are restored on
        self.made: list[Key] = []  # the (count, layer) blocks built, in order: never one twice
        self.built = 0  # merged models built: one per count tried
        self.folder: Path | None = None  # the spill folder, made at the first spill

    def __enter__(self) -> MergedBlocks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Delete the spilled blocks' folder (the held blocks stay usable; spilled ones cannot come back)."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def _owner(self, layer_module: torch.nn.Module, path: str) -> tuple[torch.nn.Module, str]:
        parent, _, name = path.rpartition(".")
        return (layer_module.get_submodule(parent) if parent else layer_module), name

    def _modules(self, decoder: Any, layer: int) -> list[torch.nn.Module]:
        return [getattr(*self._owner(decoder[layer], p)) for p in self.paths]

    def _file(self, key: Key) -> Path:
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="moe-prune-blocks-"))
        return self.folder / f"keep-{key[0]}-layer-{key[1]}.safetensors"

    def _spill(self, key: Key) -> None:
        device = spill.device_of(self.blocks[key])
        if device is not None:
            spill.spill(self.blocks[key], self._file(key))
            self.spilled[key] = device

    def _keep_only(self, wanted: set[Key]) -> None:
        """Spill every held block but the `wanted` ones."""
        for key in [key for key in self.blocks if key not in wanted and key not in self.spilled]:
            self._spill(key)

    def _build(self, count: int, needed: list[int]) -> None:
        """Merge every searched layer to `count` (one build), keep the `needed` layers' blocks, spill the rest."""
        searched = [layer for layer, on in zip(self.layers, self.searched, strict=True) if on]
        merged = self.build(count, searched)
        decoder = merged.get_submodule(self.runtime_layers)
        self.blocks.update({(count, layer): self._modules(decoder, layer) for layer in searched})
        del merged, decoder
        gc.collect()  # the rest of the merged model (attention, embeddings) goes now, not at a full collection
        self.made += [(count, layer) for layer in searched]
        self.built += 1
        for layer in searched:
            if layer not in needed:
                self._spill((count, layer))

    def _hold(self, count: int, layers: list[int]) -> None:
        """Bring the blocks merged to `count` of `layers` into memory: built at the count's first use, then restored."""
        if (count, layers[0]) not in self.blocks:
            self._build(count, layers)
        for layer in layers:
            device = self.spilled.pop((count, layer), None)
            if device is not None:
                spill.restore(self.blocks[count, layer], self._file((count, layer)), device)

    @contextmanager
    def swapped(self, counts: Counts) -> Iterator[None]:
        """Run the model inside with searched layer i's block(s) replaced by the block merged to `counts[i]`."""
        saved: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
        wanted = {layer: count for layer, count, searched in zip(self.layers, counts, self.searched, strict=True)
                  if searched}  # fmt: skip
        self._keep_only({(count, layer) for layer, count in wanted.items()})
        for count in dict.fromkeys(wanted.values()):
            self._hold(count, [layer for layer, n in wanted.items() if n == count])
        try:
            for layer, count in wanted.items():
                for path, module in zip(self.paths, self.blocks[count, layer], strict=True):
                    owner, name = self._owner(self.decoder[layer], path)
                    saved.append((owner, name, getattr(owner, name)))
                    setattr(owner, name, module)
            yield
        finally:
            for owner, name, original in reversed(saved):
                setattr(owner, name, original)
