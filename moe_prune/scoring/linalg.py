"""Small numeric helpers shared by criteria."""

from __future__ import annotations

import numpy as np


def cosine_from_gram(gram: np.ndarray) -> np.ndarray:
    """Pairwise cosine similarities `[..., E, E]` from a Gram matrix; a zero vector has cosine 0 with everything."""
    norms = np.sqrt(np.clip(np.diagonal(gram, axis1=-2, axis2=-1), 0.0, None))
    denom = norms[..., :, None] * norms[..., None, :]
    return np.divide(gram, denom, out=np.zeros_like(gram, dtype=np.float64), where=denom > 0)


def row_sum_minus_diagonal(matrix: np.ndarray) -> np.ndarray:
    """`sum(M[p, :]) - M[p, p]` per expert (MC-Suite eqs. 3, 11, 14): similarity to all the others."""
    return matrix.sum(axis=-1) - np.diagonal(matrix, axis1=-2, axis2=-1)


def popcount(bits: np.ndarray) -> np.ndarray:
    """Set bits per bitset over the last axis (uint8 `np.packbits` bytes)."""
    return np.bitwise_count(bits).sum(axis=-1, dtype=np.int64)
