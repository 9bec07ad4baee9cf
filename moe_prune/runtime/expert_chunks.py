"""Run a decoder layer whose experts exceed `--expert-memory` with its experts read a chunk at a time.

Why: `--sequential` holds one decoder layer, but one DeepSeek-V3 MoE layer's experts alone are 22.5 GB
in bf16 (256 x 3 x 7168 x 2048), more than a 24 GB machine holds next to anything else (issue #24's
memory contract: experts dequantized a bounded chunk at a time, never a whole layer that would not fit).

How, with no family named and no expert math of our own: the experts module's fused parameters
(`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`, filled by `runtime.fused` from per-expert tensors)
stay on the meta device, and its forward is replaced by `ChunkedExperts`: for each chunk of experts
that the call's `top_k_index` picks, the chunk's tensors are read (FP8 dequantized) by the one reader
into a chunk-sized buffer allocated once, and the module's OWN forward runs on it with transformers'
expert-parallel convention (the one its `_is_expert_parallel` path implements): picks inside the chunk
renumbered from 0, picks outside it set to the sentinel `chunk size` with weight 0, which every
implementation skips. The chunks' outputs are summed. Hooks see the experts module called once, as
before: the statistics wrapper (`runtime.expert_hooks`) calls this forward as the module's original.

What it costs: the chunks a call picks are read from the checkpoint on every call of the layer (every
batch), so a layer's experts are read once per batch instead of once; larger batches read less. The sum
over chunks changes the float summation order of a token's experts (equal to float rounding).
Refused in one line: an experts module with a parameter not stacked from per-expert tensors (stored
fused, biases), or one expert larger than the budget.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from moe_prune.errors import MoePruneError
from moe_prune.runtime.fused import Fused, read_into

_ATTR = "_moe_prune_expert_chunks"  # the ChunkedExperts installed on an experts module


class ChunkedExperts:
    """Stands in for an experts module's forward: its experts run `chunk` at a time, read on every call."""

    def __init__(
        self,
        module: torch.nn.Module,
        path: str,
        entries: dict[str, Fused],
        chunk: int,
        where: tuple[Path, torch.device],
    ) -> None:
        self.module, self.path, self.entries, self.chunk = module, path, entries, chunk
        self.folder, self.device = where  # (checkpoint folder, device of the buffers)
        self.experts = int(module.num_experts)
        self.buffers: dict[str, torch.Tensor] = {}  # attribute -> [chunk, ...] buffer, allocated once
        self.loaded: tuple[int, int] | None = None  # the experts now in the buffers
        self.single: dict[str, torch.Tensor] = {}  # attribute -> [1, ...] buffer of one expert read alone
        self.reads = 0  # chunks read from the checkpoint (tests, measurements)

    def __call__(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        if top_k_index.numel() and (int(top_k_index.min()) < 0 or int(top_k_index.max()) >= self.experts):
            raise MoePruneError(
                f"{self.folder}: {self.path} picks experts past its {self.experts} (a family's zero experts); "
                "--expert-memory cannot split them, leave it out"
            )
        starts = [s for s in range(0, self.experts, self.chunk) if _picks(top_k_index, s, self._stop(s)).any()]
        result: torch.Tensor | None = None
        for start in starts or [0]:  # no pick at all: the module still gives its (zero) output
            stop = self._stop(start)
            inside = _picks(top_k_index, start, stop)
            index = torch.where(inside, top_k_index - start, torch.full_like(top_k_index, stop - start))
            weights = torch.where(inside, top_k_weights, torch.zeros_like(top_k_weights))
            with self._chunk(start, stop):
                out = type(self.module).forward(self.module, hidden, index, weights, *args, **kwargs)
            result = out if result is None else result + out
        assert result is not None
        return result

    def expert(self, attr: str, expert: int) -> torch.Tensor:
        """Parameter `attr` of one expert: a view of the loaded chunk when it holds the expert, else the expert
        read alone into a one-expert buffer (allocated once per attribute; `merge --refit`'s sums of a slot)."""
        if self.loaded is not None and self.loaded[0] <= expert < self.loaded[1]:
            return self.buffers[attr][expert - self.loaded[0]]
        if attr not in self.single:
            meta = self.module._parameters[attr]
            self.single[attr] = torch.empty((1, *meta.shape[1:]), dtype=meta.dtype, device=self.device)
        entry = self.entries[attr]
        one = {p: tensors[expert : expert + 1] for p, tensors in entry.sources.items()}
        read_into(self.single[attr], replace(entry, sources=one), f"{self.path}.{attr}", self.folder)
        self.reads += 1
        return self.single[attr][0]

    def _stop(self, start: int) -> int:
        return min(start + self.chunk, self.experts)

    @contextmanager
    def _chunk(self, start: int, stop: int):
        """The module's parameters and expert count are those of experts [start, stop) while inside."""
        module, count = self.module, stop - start
        placeholders = {attr: module._parameters[attr] for attr in self.entries}
        views, fresh = {}, self.loaded != (start, stop)
        self.loaded = None if fresh else self.loaded  # a read that fails half-way leaves no stale chunk behind
        for attr, entry in self.entries.items():
            meta = placeholders[attr]
            if attr not in self.buffers:
                shape = (self.chunk, *meta.shape[1:])
                self.buffers[attr] = torch.empty(shape, dtype=meta.dtype, device=self.device)
            views[attr] = self.buffers[attr][:count]
            if fresh:
                chunk = {p: tensors[start:stop] for p, tensors in entry.sources.items()}
                read_into(views[attr], replace(entry, sources=chunk), f"{self.path}.{attr}", self.folder)
        self.reads += fresh
        self.loaded = (start, stop)
        parallel = module.__dict__.get("_is_expert_parallel")
        try:
            for attr, view in views.items():
                module._parameters[attr] = torch.nn.Parameter(view, requires_grad=False)
            module.num_experts = count
            if parallel is not None:
                module._is_expert_parallel = True  # transformers' sentinel handling in its batched paths
            yield
        finally:
            module._parameters.update(placeholders)
            module.num_experts = self.experts
            if parallel is not None:
                module._is_expert_parallel = parallel


def expert_param(module: torch.nn.Module, attr: str, expert: int) -> torch.Tensor:
    """Parameter `attr` of expert `expert` of an experts module, whether its experts are chunked or loaded."""
    chunked = module.__dict__.get(_ATTR)
    return chunked.expert(attr, expert) if chunked is not None else getattr(module, attr)[expert]


def _picks(index: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return (index >= start) & (index < stop)


def install(
    model: torch.nn.Module, stacked: dict[str, Fused], budget: int | None, experts: str | None, where: Any
) -> set[str]:
    """Chunked forwards on the experts modules whose stacked parameters exceed `budget` bytes; returns the
    parameter names left on meta (read a chunk at a time), which the caller must not fill. `experts`: the
    family's experts module of the layer being loaded, refused when over `budget` and not stackable here."""
    if budget is None:
        return set()
    folder, device = where
    by_module: dict[str, dict[str, Fused]] = defaultdict(dict)
    for name, entry in stacked.items():
        path, _, attr = name.rpartition(".")
        by_module[path][attr] = entry
    deferred: set[str] = set()
    for path, entries in by_module.items():
        module = model.get_submodule(path)
        per_expert = _expert_bytes(module, path, entries, folder)
        experts = int(module.num_experts)
        if per_expert * experts <= budget:
            continue
        if per_expert > budget:
            raise MoePruneError(
                f"--expert-memory {budget} bytes holds no expert of {path} (one expert: {per_expert} bytes)"
            )
        chunked = ChunkedExperts(module, path, entries, budget // per_expert, (folder, device))
        module.__dict__[_ATTR] = chunked
        module.forward = chunked
        deferred.update(f"{path}.{attr}" for attr in entries)
    _check_fused(model, experts, set(by_module), budget, folder)
    return deferred


def _check_fused(model: torch.nn.Module, experts: str | None, stacked: set[str], budget: int, folder: Path) -> None:
    """The layer's experts module, when over `budget` with no parameter stacked from per-expert tensors (stored
    fused in the checkpoint: loaded whole by transformers), is refused: the budget would silently not hold."""
    try:
        module = model.get_submodule(experts) if experts else None
    except AttributeError:  # a dense layer
        return
    if module is None or any(path == experts or path.startswith(experts + ".") for path in stacked):
        return
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    if size > budget:
        raise MoePruneError(
            f"{folder}: --expert-memory cannot split the experts of {experts} (stored fused in the checkpoint, "
            f"not one tensor per expert: {size} bytes load whole); leave it out"
        )


def _expert_bytes(module: torch.nn.Module, path: str, entries: dict[str, Fused], folder: Path) -> int:
    """Bytes of one expert's parameters in the working dtype; refuses a module this cannot split."""
    from transformers.core_model_loading import MergeModulelist

    def refuse(reason: str) -> MoePruneError:
        return MoePruneError(f"{folder}: --expert-memory cannot split the experts of {path} ({reason}); leave it out")

    experts = getattr(module, "num_experts", None)
    if not isinstance(experts, int) or experts < 2:
        raise refuse("no expert count `num_experts`")
    total = 0
    for attr, param in module.named_parameters(recurse=False):
        entry = entries.get(attr)
        if entry is None:
            raise refuse(f"{attr} is not stacked from per-expert checkpoint tensors")
        merge = entry.operations[0] if entry.operations else None
        if not isinstance(merge, MergeModulelist) or merge.dim != 0 or param.shape[0] != experts:
            raise refuse(f"{attr} is not stacked on its first axis")
        if any(len(tensors) != experts for tensors in entry.sources.values()):
            raise refuse(f"{attr} has not one checkpoint tensor per expert")
        total += param[0].numel() * param.element_size()
    return total


def to_device(layer: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`layer.to(device)` with the chunked experts' parameters left on meta (read a chunk at a time)."""
    held = {}
    for module in layer.modules():
        if _ATTR in module.__dict__:
            held[module] = dict(module._parameters)
            module._parameters.clear()
    try:
        return layer.to(device)
    finally:
        for module, params in held.items():
            module._parameters.update(params)


def remove(layer: torch.nn.Module) -> None:
    """Chunked forwards off `layer`'s experts modules (their buffers freed), before the layer goes back to meta."""
    for module in layer.modules():
        if module.__dict__.pop(_ATTR, None) is not None:
            module.__dict__.pop("forward", None)


def held_bytes(layer: torch.nn.Module) -> int:
    """Bytes `layer` holds once loaded: its parameters off the meta device, plus the chunk buffers of its chunked
    experts (allocated at their first call)."""
    total = sum(p.numel() * p.element_size() for p in layer.parameters() if not p.is_meta)
    for chunks in chunked(layer):
        meta = [chunks.module._parameters[attr] for attr in chunks.entries]
        total += chunks.chunk * sum(p[0].numel() * p.element_size() for p in meta)
    return total


def chunked(layer: torch.nn.Module) -> list[ChunkedExperts]:
    """The chunked experts of `layer` (tests and measurements)."""
    return [module.__dict__[_ATTR] for module in layer.modules() if _ATTR in module.__dict__]
