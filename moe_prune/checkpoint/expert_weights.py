"""Read routed-expert weights and router rows layer by layer, in bounded pieces, for criteria that score weights.

Never a layer's experts as one float32 stack (DeepSeek-V3's 256 FP8 experts of 3 x 2048 x 7168 would be 45 GB, and
a bf16 layer's stack is 2x the layer, past issue #24's 1.5-layer memory contract): a layer is a list of each
expert's tensors (`Stored`, byte ranges), read through `checkpoint.quantized.read_expert_tensor` (the one reader,
which dequantizes FP8 and MXFP4) either one expert's tensor at a time or the same rows of every expert at once,
at most `CHUNK_BYTES` of float32 in either case. Both on-disk layouts are accepted: one tensor per expert
(`...experts.{e}.w1.weight`) and fused tensors with a leading expert axis (`[E, 2I, H]`, or dbrx's blocked
`[E*I, H]`), cut into each expert's byte range by `checkpoint.expert_slices.fused_expert`; other non-float
tensors are refused.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from moe_prune.checkpoint.expert_slices import fused_expert
from moe_prune.checkpoint.quantized import Quantization, Stored, group, read_expert_tensor
from moe_prune.checkpoint.safetensors_io import FLOAT_DTYPES
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.checkpoint.surgery import ExpertKey, KeyMatcher
from moe_prune.errors import MoePruneError

# The float32 working set of one read (the default of `LayerWeights.chunks` / `expert`, looked up at call time):
# a row chunk of every expert (the Gram matrix of weight-similarity) or a row chunk of one expert. 256 MiB keeps
# score far inside the 1.5-layer contract (a DeepSeek-V3 MoE layer is 11 GB in FP8, 22.5 GB in bf16); one read of
# a chunk per expert is still 1 MiB there (256 experts), large enough to run near disk speed.
CHUNK_BYTES = 256 << 20


@dataclass
class LayerWeights:
    """One MoE layer: each routed expert's tensors as byte ranges (read on demand), and the router `[E, H]`."""

    layer: int
    tensors: dict[str, list[Stored]]  # key tail (e.g. `w1.weight`, `gate_up_proj`) -> expert e's tensor
    router: torch.Tensor

    def __len__(self) -> int:
        """The layer's expert count (its own, in a ragged model)."""
        return self.router.shape[0]

    def chunks(self, bound: int | None = None) -> Iterator[torch.Tensor]:
        """`[E, k]` float32 blocks of at most `bound` bytes (one row if a row is larger): the same stored rows of
        every expert, so concatenated they are each expert's flattened weights (in one order for all experts)."""
        bound = CHUNK_BYTES if bound is None else bound
        for slots in self.tensors.values():
            for part in _parts(slots[0], bound // len(slots)):
                chunk = torch.empty((len(slots), _rows(slots[0], part) * _row_floats(slots[0])))
                for e, stored in enumerate(slots):
                    chunk[e] = read_expert_tensor(stored, PURPOSE, part=part).reshape(-1)
                yield chunk
                del chunk  # not held while the next one is allocated (the caller drops its own, see _gram)

    def expert(self, e: int, bound: int | None = None) -> Iterator[torch.Tensor]:
        """Expert `e`'s tensors in row parts of at most `bound` float32 bytes (one row if a row is larger)."""
        bound = CHUNK_BYTES if bound is None else bound
        for slots in self.tensors.values():
            for part in _parts(slots[e], bound):
                yield read_expert_tensor(slots[e], PURPOSE, part=part)

    def matrices(self, e: int) -> Iterator[torch.Tensor]:
        """Expert `e`'s 2-D weight matrices, whole and one at a time (biases and other shapes skipped)."""
        for slots in self.tensors.values():
            if len(slots[e].shape) == 2:
                yield read_expert_tensor(slots[e], PURPOSE)


def _row_floats(stored: Stored) -> int:
    """Float values in one stored row (leading axis) of `stored`; a 0-d tensor is one row of one."""
    return math.prod(stored.shape) // stored.data.shape[0] if stored.data.shape else 1


def _rows(stored: Stored, part: tuple[int, int] | None) -> int:
    return 1 if part is None else part[1] - part[0]


def _parts(stored: Stored, bound: int) -> Iterator[tuple[int, int] | None]:
    """Row ranges of `stored`'s leading axis, each at most `bound` bytes of float32 (at least one row); None (the
    whole tensor) for a 0-d one."""
    if not stored.data.shape:
        yield None
        return
    step = max(1, bound // max(4 * _row_floats(stored), 1))
    for start in range(0, stored.data.shape[0], step):
        yield start, min(start + step, stored.data.shape[0])


class ExpertWeights:
    """Streams `LayerWeights` of a checkpoint in MoE-layer order; headers are indexed once, weights read lazily."""

    def __init__(self, ckpt: Checkpoint, progress: Callable[[int, int], None] | None = None) -> None:
        self.ckpt = ckpt
        self.progress = progress  # progress(layers done, layers) after each layer is scored
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
        """One layer's experts (byte ranges, nothing read yet) and its router rows as float32."""
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
        _check_float([info for slots in per_expert.values() for info in slots.values()] + fused)
        tensors = {info.name: [fused_expert(info, n, e) for e in range(n)] for info in fused}
        for tail, slots in per_expert.items():
            tensors[tail] = [slots[e] for e in range(n)]
            for stored in tensors[tail]:
                if stored.shape != slots[0].shape:
                    raise MoePruneError(
                        f"{stored.file}: {stored.name} has shape {stored.shape}, expert 0's {tail} {slots[0].shape}"
                    )
        _check_float([self._routers[layer]])
        router = read_expert_tensor(self._routers[layer], PURPOSE).reshape(n, -1)
        return LayerWeights(layer, tensors, router)


PURPOSE = "its experts cannot be scored by their weights"


def _check_float(infos: list[Stored]) -> None:
    """Refuse non-float tensors that are not a quantization moe-prune reads."""
    for info in infos:
        if not info.quantized and info.data.dtype not in FLOAT_DTYPES:
            raise MoePruneError(
                f"{info.file}: {info.name} is {info.data.dtype} (quantised); weight criteria need float weights "
                "(FP8 with weight_scale_inv and MXFP4 are read when config.json's quantization_config says so; "
                "otherwise dequantise first, or use a statistics-based criterion)"
            )
