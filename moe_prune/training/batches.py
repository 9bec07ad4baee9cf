"""Deterministic batches: which chunks each process uses at each micro-step follows from seed and step alone.

The chunks are visited in a fresh seeded permutation every epoch (seed + epoch), laid end to end into one
stream. Optimizer step s consumes the next `batch_size * grad_accum * processes` chunks of that stream:
micro-step m, process p takes `batch_size` consecutive ones. A resumed run therefore needs only the step
to find its place, and every process takes its own slice without talking to the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchPlan:
    """How the chunks of a run are dealt out."""

    chunks: int  # number of [seq_len] chunks in the training data
    batch_size: int
    grad_accum: int
    processes: int
    seed: int

    @property
    def per_step(self) -> int:
        """Chunks consumed by one optimizer step over all processes."""
        return self.batch_size * self.grad_accum * self.processes

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.chunks, generator=generator)

    def indices(self, step: int, micro: int, process: int) -> torch.Tensor:
        """Chunk indices of one process's micro-batch."""
        start = step * self.per_step + (micro * self.processes + process) * self.batch_size
        positions = torch.arange(start, start + self.batch_size)
        epochs = positions // self.chunks
        out = torch.empty_like(positions)
        for epoch in epochs.unique().tolist():
            where = epochs == epoch
            out[where] = self._permutation(epoch)[positions[where] % self.chunks]
        return out

    def epochs(self, steps: int) -> float:
        """How many passes over the data `steps` optimizer steps make."""
        return steps * self.per_step / self.chunks
