"""Several processes profiling one calibration set (`accelerate launch -m moe_prune profile ...`).

Each process takes its own contiguous slice of the sequences; at the end the sums are added
across processes (`sum` statistics by all-reduce, `or` bitsets by all-gather then OR, so any
backend works, NCCL included, which has no bitwise reductions), and only rank 0 writes the file.
With `--gradients` the accumulated expert gradients are all-reduced before the (nonlinear)
gradient statistics are taken, so they stay those of the whole calibration set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from moe_prune.artifacts.stats import STAT_FIELDS


@dataclass(frozen=True)
class World:
    """This process's place among the profiling processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """A bare `cuda` means this process's own GPU under a launcher."""
        return f"cuda:{self.local_rank}" if device == "cuda" and self.size > 1 else device


def world() -> World:
    """The distributed world when launched by accelerate/torchrun (initialised here if needed), else one process."""
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), local)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World()
    from accelerate import PartialState

    # Reads the launcher's environment and initialises the process group (gloo without GPUs).
    state = PartialState(cpu=not torch.cuda.is_available())
    return World(state.process_index, state.num_processes, state.local_process_index)


def finish() -> None:
    """Tear the process group down (gloo aborts at exit otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _device() -> torch.device:
    """Where collectives run: the backend's device (NCCL needs CUDA tensors, gloo CPU ones)."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_arrays(arrays: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Statistics of the union of every process's data (rules of `artifacts.stats`).

    `final` statistics are already computed from the all-reduced gradients, the same on every process.
    """
    import torch.distributed as dist

    if size <= 1:
        return arrays
    device = _device()
    out = {}
    for name, array in arrays.items():
        rule = STAT_FIELDS[name][0]
        if rule == "final":
            out[name] = array
            continue
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(device)
        if rule == "or":
            parts = [torch.empty_like(tensor) for _ in range(size)]
            dist.all_gather(parts, tensor)
            tensor = parts[0]
            for part in parts[1:]:
                tensor = tensor | part
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if rule == "max" else dist.ReduceOp.SUM)
        out[name] = tensor.cpu().numpy()
    return out


def reduce_gradients(params: list[list[torch.nn.Parameter]], predictions: int, size: int) -> int:
    """Add every process's accumulated expert gradients in place; returns the total number of predictions."""
    import torch.distributed as dist

    if size <= 1:
        return predictions
    device = _device()
    for layer in params:
        for p in layer:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grad = p.grad.to(device)
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            p.grad.copy_(grad)
    total = torch.tensor([predictions], dtype=torch.int64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return int(total.item())


def total(count: int, size: int) -> int:
    """Sum of an integer over the processes."""
    import torch.distributed as dist

    if size <= 1:
        return count
    value = torch.tensor([count], dtype=torch.int64, device=_device())
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return int(value.item())
