"""Deterministic batches: which rows each process uses at each micro-step follows from seed and step alone.

The rows are visited in a fresh seeded permutation every epoch (seed + epoch), laid end to end into one
stream. Optimizer step s consumes the next `batch_size * grad_accum * processes` rows of that stream:
micro-step m, process p takes `batch_size` consecutive ones. A resumed run therefore needs only the step
to find its place, and every process takes its own slice without talking to the others.

A row is a fixed-length chunk of a token stream (`--format text`: every next token carries loss) or one
right-padded prompt/response example (`training.sft`: labels say which tokens carry loss).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

IGNORE = -100  # label of a position that carries no loss (torch's cross_entropy ignore_index)


@dataclass(frozen=True)
class Sequences:
    """Training or held-out rows; `labels`/`lengths` are None for plain text chunks (full rows, all loss)."""

    ids: torch.Tensor  # [N, T] token ids
    labels: torch.Tensor | None = None  # [N, T]: the token where it carries loss, IGNORE elsewhere
    lengths: torch.Tensor | None = None  # [N] real tokens per row; the rest is padding

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(ids, targets, attention mask or None) of rows `index`, cut after the longest row's last token.

        Padding is on the right, so cutting it off (and masking what remains) changes no real position.
        """
        ids = self.ids[index]
        if self.labels is None or self.lengths is None:
            return ids, ids, None
        lengths = self.lengths[index]
        width = int(lengths.max())
        mask = (torch.arange(width) < lengths[:, None]).long()
        return ids[:, :width], self.labels[index][:, :width], mask

    def loss_tokens(self, index: torch.Tensor) -> int:
        """How many positions of rows `index` carry loss (position t predicts token t + 1)."""
        if self.labels is None:
            return len(index) * (self.ids.shape[1] - 1)
        return int((self.labels[index][:, 1:] != IGNORE).sum())

    def eval_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Row indices for held-out scoring: `batch_size` chunks at a time, examples one by one (no padding,
        so routing statistics see real tokens only)."""
        size = batch_size if self.lengths is None else 1
        for start in range(0, len(self), size):
            yield torch.arange(start, min(start + size, len(self)))

    def digest(self) -> str:
        """Short hash of the ids (and labels): what the training data was, for the run's fingerprint."""
        h = hashlib.sha256(self.ids.numpy().tobytes())
        if self.labels is not None:
            h.update(self.labels.numpy().tobytes())
        return "sha256:" + h.hexdigest()[:16]


@dataclass(frozen=True)
class BatchPlan:
    """How the rows of a run are dealt out."""

    chunks: int  # number of rows in the training data
    batch_size: int
    grad_accum: int
    processes: int
    seed: int

    @property
    def per_step(self) -> int:
        """Rows consumed by one optimizer step over all processes."""
        return self.batch_size * self.grad_accum * self.processes

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.chunks, generator=generator)

    def _rows(self, positions: torch.Tensor) -> torch.Tensor:
        epochs = positions // self.chunks
        out = torch.empty_like(positions)
        for epoch in epochs.unique().tolist():
            where = epochs == epoch
            out[where] = self._permutation(epoch)[positions[where] % self.chunks]
        return out

    def indices(self, step: int, micro: int, process: int) -> torch.Tensor:
        """Row indices of one process's micro-batch."""
        start = step * self.per_step + (micro * self.processes + process) * self.batch_size
        return self._rows(torch.arange(start, start + self.batch_size))

    def step_indices(self, step: int) -> torch.Tensor:
        """Every row of optimizer step `step`, over all micro-batches and processes."""
        return self._rows(torch.arange(step * self.per_step, (step + 1) * self.per_step))

    def epochs(self, steps: int) -> float:
        """How many passes over the data `steps` optimizer steps make."""
        return steps * self.per_step / self.chunks
