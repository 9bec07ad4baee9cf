"""Expert similarity from router logits (UNCURL, Algorithm 1 lines 2-4)."""

from __future__ import annotations

import numpy as np


def router_similarity(logit_gram: np.ndarray) -> np.ndarray:
    """S = (1 + cos) / 2 of the router-logit columns, from their Gram matrix G = sum over tokens of z z^T.

    cos_ij = G_ij / sqrt(G_ii G_jj); an expert whose logits were always zero gets cosine 0 with every
    other expert (S = 0.5) and 1 with itself. The result is symmetric, in [0, 1], with a unit diagonal.
    """
    gram = np.asarray(logit_gram, dtype=np.float64)
    gram = (gram + gram.T) / 2
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    denom = np.outer(norms, norms)
    cosine = np.divide(gram, denom, out=np.zeros_like(gram), where=denom > 0)
    np.fill_diagonal(cosine, 1.0)
    return (1.0 + np.clip(cosine, -1.0, 1.0)) / 2.0
