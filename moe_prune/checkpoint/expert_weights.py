"""Read routed-expert weights and router rows layer by layer, for criteria that score weights.

Only one MoE layer's expert tensors are in memory at a time (as float32 `[E, ...]` stacks), read from
the shards byte range by byte range, so a model far larger than memory can be scored; per-expert
tensors are read straight into their stack's slot (one stack, not the tensors and then their stack). Both on-disk
layouts are accepted: one tensor per expert (`...experts.{e}.w1.weight`, stacked here) and fused
tensors with a leading expert axis (`[E, 2I, H]`, or dbrx's blocked `[E*I, H]`, reshaped to
`[E, I, H]`). FP8 block-quantized and MXFP4 tensors are dequantized one tensor at a time by
`checkpoint.quantized.read_float` (the one dequantizing function); other non-float tensors are refused.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from moe_prune.checkpoint.quantized import Quantization, Stored, group, read_expert_tensor, split_experts
from moe_prune.checkpoint.safetensors_io import FLOAT_DTYPES
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.checkpoint.surgery import ExpertKey, KeyMatcher
from moe_prune.errors import MoePruneError


@dataclass
class LayerWeights:
    """One MoE layer: its routed experts' tensors as `[E, ...]` float32 stacks, and the router `[E, H]`."""

    layer: int
    tensors: dict[str, torch.Tensor]  # key tail (e.g. `w1.weight`, `gate_up_proj`) -> [E, ...]
    router: torch.Tensor

    def flat(self) -> Iterator[torch.Tensor]:
        """Each tensor as `[E, numel per expert]`: concatenating these gives each expert's flattened weights."""
        for tensor in self.tensors.values():
            yield tensor.reshape(tensor.shape[0], -1)

    def matrices(self) -> Iterator[torch.Tensor]:
        """The per-expert 2-D weight matrices as `[E, rows, cols]` (biases and other shapes skipped)."""
        for tensor in self.tensors.values():
            if tensor.dim() == 3:
                yield tensor


class ExpertWeights:
    """Streams `LayerWeights` of a checkpoint in MoE-layer order; headers are indexed once, weights read lazily."""

    def __init__(self, ckpt: Checkpoint, progress: Callable[[int, int], None] | None = None) -> None:
        self.ckpt = ckpt
        self.progress = progress  # progress(layers done, layers) after each layer is read
        config = ckpt.config
        self.n_experts = config.num_experts  # the largest count; a ragged model's layers have their own
        self.counts = config.experts_per_layer
        self.layers = config.moe_layers
        matcher = KeyMatcher(config.adapter)
        router_bias = config.adapter.router_bias
        self._experts: dict[int, list[tuple[Stored, ExpertKey]]] = defaultdict(list)
        self._routers: dict[int, Stored] = {}
        for info in group(ckpt.tensors, Quantization.from_config(config.raw)):
            if (layer := matcher.is_router(info.name)) is not None:
                self._routers[layer] = info
                continue
            key = matcher.classify(info.name)
            if key is None or key.kind == "last_axis" or key.layer not in self.layers:
                continue
            if router_bias and info.name.endswith(router_bias):
                continue
            self._experts[key.layer].append((info, key))
        for layer in self.layers:
            if layer not in self._routers:
                raise MoePruneError(f"{ckpt.folder}: no router weight ({config.adapter.router}) for MoE layer {layer}")
            if not self._experts[layer]:
                raise MoePruneError(f"{ckpt.folder}: no routed-expert weights found for MoE layer {layer}")

    def __iter__(self) -> Iterator[LayerWeights]:
        for done, layer in enumerate(self.layers, 1):
            yield self.load(layer)
            if self.progress:
                self.progress(done, len(self.layers))

    def load(self, layer: int) -> LayerWeights:
        """Read one layer's expert stacks and router rows as float32 (each shard opened once)."""
        n = self.counts[layer]
        per_expert: dict[str, dict[int, Stored]] = defaultdict(dict)
        fused: list[Stored] = []
        for info, key in self._experts[layer]:
            if key.kind != "per_expert":
                fused.append(info)
                continue
            assert key.slot is not None
            if key.slot >= n:
                raise MoePruneError(f"{info.file}: {info.name} names expert {key.slot} but layer {layer} has {n}")
            per_expert[key.tail][key.slot] = info
        for tail, slots in per_expert.items():
            missing = sorted(set(range(n)) - set(slots))
            if missing:
                raise MoePruneError(
                    f"{self.ckpt.folder}: layer {layer} has no {tail!r} tensor for experts {missing[:5]}"
                )
        _check_float([info for slots in per_expert.values() for info in slots.values()])
        loaded = _read_all([self._routers[layer], *fused])
        tensors = {info.name: split_experts(loaded[info.name], n, info) for info in fused}
        for tail, slots in per_expert.items():
            stack = torch.empty((n, *slots[0].shape), dtype=torch.float32)
            for e in range(n):
                read_expert_tensor(slots[e], PURPOSE, out=stack[e])
            tensors[tail] = stack
        router = loaded[self._routers[layer].name].reshape(n, -1)
        return LayerWeights(layer, tensors, router)


PURPOSE = "its experts cannot be scored by their weights"


def _read_all(infos: list[Stored]) -> dict[str, torch.Tensor]:
    """The named tensors as float32 (dequantized one at a time); a one-line error for non-finite ones."""
    _check_float(infos)
    return {info.name: read_expert_tensor(info, PURPOSE) for info in infos}


def _check_float(infos: list[Stored]) -> None:
    """Refuse non-float tensors that are not a quantization moe-prune reads."""
    for info in infos:
        if not info.quantized and info.data.dtype not in FLOAT_DTYPES:
            raise MoePruneError(
                f"{info.file}: {info.name} is {info.data.dtype} (quantised); weight criteria need float weights "
                "(FP8 with weight_scale_inv and MXFP4 are read when config.json's quantization_config says so; "
                "otherwise dequantise first, or use a statistics-based criterion)"
            )
