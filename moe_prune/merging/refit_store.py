"""Solved down projections kept on disk until the writer asks for them, so a merge never holds the model's refit.

Why not in memory: D x I x H floats per layer is the size of the merged model's down projections in
float32 (24 GB for Qwen3-30B-A3B at half its experts). Each layer's solutions go, in float32 (what
`merging.refit.down_tensor` hands the writer anyway), to an anonymous temporary file (`tempfile.TemporaryFile`:
already unlinked on POSIX, so nothing is left behind even when the run is killed) as each slot is solved,
and are read back one slot at a time. The store behaves as the tuple of arrays `merging.tensors.LayerPlan.refit`
expects.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, overload

import numpy as np


class SpilledDowns(Sequence[np.ndarray]):
    """D^T [I, H] per slot in float32, in an anonymous temporary file."""

    def __init__(self, downs: Sequence[np.ndarray] = (), folder: Path | None = None) -> None:
        # Held open for the store's life (read back by the writer), closed by `close` or garbage collection.
        self._file: IO[bytes] = tempfile.TemporaryFile(prefix="moe-prune-refit-", dir=folder)  # noqa: SIM115
        self.shape: tuple[int, ...] | None = None
        self._count = self._nbytes = 0
        for down in downs:
            self.append(down)

    def append(self, down: np.ndarray) -> None:
        """One more slot's D^T, written at once: the pass solves a slot and drops its float64 solution."""
        if self.shape is None:
            self.shape, self._nbytes = tuple(down.shape), int(np.prod(down.shape)) * 4
        elif tuple(down.shape) != self.shape:
            raise ValueError(f"down projection of shape {tuple(down.shape)} in a store of {self.shape}")
        self._file.seek(0, 2)
        self._file.write(np.ascontiguousarray(down, dtype=np.float32).tobytes())
        self._file.flush()
        self._count += 1

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, index: slice) -> list[np.ndarray]: ...
    def __getitem__(self, index: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        if not -self._count <= index < self._count:
            raise IndexError(index)
        self._file.seek((index % self._count) * self._nbytes)
        data = bytearray(self._file.read(self._nbytes))  # writable: torch.from_numpy warns on read-only arrays
        return np.frombuffer(data, dtype=np.float32).reshape(self.shape or ())

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(self._count))

    def close(self) -> None:
        self._file.close()
