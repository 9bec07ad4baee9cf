"""Resumable profiling: the running sums every N batches in a sidecar file, and continuing from it.

The sidecar (`OUT.partial.npz`) holds the recorder's sums exactly as `StatisticsRecorder.arrays()`
returns them, the accumulated expert gradients with `--gradients`, the number of batches done and
a fingerprint of model, tokens and options. Resuming restores the sums and skips the batches done;
the remaining batches add in the same order as in an uninterrupted run, so the result is the same
file bit for bit. A sidecar of another model, data or options is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_prune.artifacts.common import describe
from moe_prune.artifacts.npz import NPZ_ERRORS, open_npz
from moe_prune.errors import MoePruneError
from moe_prune.io.output import atomic_file

GRAD_PREFIX = "__grad__"


def partial_path(out: Path, rank: int = 0) -> Path:
    """Where the resumable state of a profile writing `out` lives (one file per process)."""
    return out.with_name(out.name + (".partial.npz" if rank == 0 else f".partial-{rank}.npz"))


@dataclass
class Resumable:
    """Checkpointing of one profile run to `path` every `every` batches (0: never)."""

    path: Path | None
    fingerprint: str
    every: int

    def due(self, batches_done: int, batches_total: int) -> bool:
        return bool(self.path) and self.every > 0 and batches_done % self.every == 0 and batches_done < batches_total

    def save(self, recorder: Any, expert_params: list[list[torch.nn.Parameter]] | None, done: int, predictions: int):
        """Write atomically: a crash while saving leaves the previous checkpoint intact."""
        assert self.path is not None
        arrays = dict(recorder.arrays())
        for i, layer in enumerate(expert_params or []):
            for j, param in enumerate(layer):
                grad = param.grad if param.grad is not None else torch.zeros_like(param)
                arrays[f"{GRAD_PREFIX}{i}_{j}"] = grad.detach().float().cpu().numpy()
        meta = np.array([self.fingerprint, str(done), str(predictions)])
        with atomic_file(self.path, force=True) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, __resume__=meta, **arrays)

    def restore(
        self, recorder: Any, expert_params: list[list[torch.nn.Parameter]] | None, device: torch.device
    ) -> tuple[int, int]:
        """(batches done, predictions) after loading the sums; (0, 0) when there is nothing to resume."""
        if self.path is None or not self.path.exists():
            return 0, 0
        arrays = _read(self.path)
        done, predictions = _progress(arrays.pop("__resume__", None), self.fingerprint, self.path)
        expected = dict(recorder.arrays())
        for i, layer in enumerate(expert_params or []):
            for j, param in enumerate(layer):
                expected[f"{GRAD_PREFIX}{i}_{j}"] = np.empty(tuple(param.shape), dtype=np.float32)
        _check_layout(arrays, expected, self.path)
        grads = {k: arrays.pop(k) for k in [k for k in arrays if k.startswith(GRAD_PREFIX)]}
        recorder.restore(arrays, device)
        for i, layer in enumerate(expert_params or []):
            for j, param in enumerate(layer):
                param.grad = torch.from_numpy(grads[f"{GRAD_PREFIX}{i}_{j}"]).to(param.device, param.dtype)
        return done, predictions


def _read(path: Path) -> dict[str, np.ndarray]:
    """Every array of the resume file; a truncated, foreign or pickled file is a one-line error."""
    try:
        with open_npz(path, str(path)) as data:  # sizes its headers claim checked before reading
            return {name: data[name] for name in data.files}
    except NPZ_ERRORS as exc:
        raise MoePruneError(f"{path}: unreadable resume file ({describe(exc)}); delete it to start over") from exc


def _progress(meta: np.ndarray | None, fingerprint: str, path: Path) -> tuple[int, int]:
    """(batches done, predictions) from the `__resume__` entry, after checking it belongs to this run."""
    if meta is None or meta.shape != (3,) or meta.dtype.kind != "U":
        raise MoePruneError(f"{path}: not a moe-prune resume file; delete it to start over")
    if str(meta[0]) != fingerprint:
        raise MoePruneError(
            f"{path}: was written for another model, data or options; delete it or run without --resume"
        )
    try:
        done, predictions = int(meta[1]), int(meta[2])
    except ValueError as exc:
        raise MoePruneError(f"{path}: corrupt progress counters; delete it to start over") from exc
    if done < 0 or predictions < 0:
        raise MoePruneError(f"{path}: corrupt progress counters; delete it to start over")
    return done, predictions


def _check_layout(arrays: dict[str, np.ndarray], expected: dict[str, np.ndarray], path: Path) -> None:
    """The same arrays, shapes and dtypes this run saves, and finite sums: nothing half-restored."""
    if set(arrays) != set(expected):
        missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
        raise MoePruneError(
            f"{path}: corrupt resume file (missing {missing[:3]}, unexpected {extra[:3]}); delete it to start over"
        )
    for key, want in expected.items():
        got = arrays[key]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise MoePruneError(
                f"{path}: corrupt resume file ({key} is {got.dtype} {got.shape}, expected {want.dtype} {want.shape}); "
                "delete it to start over"
            )
        if got.dtype.kind == "f" and not np.isfinite(got).all():
            raise MoePruneError(f"{path}: corrupt resume file ({key} holds NaN or Inf); delete it to start over")
