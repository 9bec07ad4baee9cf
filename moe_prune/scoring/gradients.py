"""Gradient-guided criteria (MC-Suite section 2.5), from reductions of each expert's accumulated weight gradient.

Produced by `moe-prune profile --gradients`; without them these criteria refuse with that hint.
"""

from __future__ import annotations

import numpy as np

from moe_prune.scoring.linalg import cosine_from_gram, row_sum_minus_diagonal
from moe_prune.scoring.registry import Inputs, criterion


@criterion(
    "gradient-similarity",
    "mean cosine similarity of the expert's accumulated gradient to the others' (max drops the most redundant)",
    direction="max",
    stats=("grad_gram",),
    source="MC-Suite EGS, eq. 14",
)
def gradient_similarity(inputs: Inputs) -> np.ndarray:
    """score_p = sum_q cos(g_p, g_q) - cos(g_p, g_p), g = flattened accumulated weight gradient (cos from grad_gram)."""
    return row_sum_minus_diagonal(cosine_from_gram(inputs.array("grad_gram")))


@criterion(
    "gradient-entropy",
    "sum over hidden dims of log std of the expert's accumulated gradient (paper: min best)",
    stats=("grad_entropy",),
    source="MC-Suite EGE, eq. 15; Table 1 uses min",
)
def gradient_entropy(inputs: Inputs) -> np.ndarray:
    """score_p = sum_h log std_h of the accumulated gradient of expert p (computed by `profile`)."""
    return inputs.array("grad_entropy")


@criterion(
    "gradient-outliers",
    "number of accumulated-gradient elements beyond mean +- 3 std of the expert's gradient",
    stats=("grad_outliers",),
    source="MC-Suite EGO (c = 3)",
)
def gradient_outliers(inputs: Inputs) -> np.ndarray:
    """score_p = count of elements of g_p outside mu +- 3 sigma of g_p."""
    return inputs.array("grad_outliers")


@criterion(
    "gradient-norm",
    "L2 norm of the expert's accumulated weight gradient",
    stats=("grad_gram",),
    source="MC-Suite EGN, eq. 16",
)
def gradient_norm(inputs: Inputs) -> np.ndarray:
    """score_p = ||g_p||_2 = sqrt(grad_gram[p, p])."""
    return np.sqrt(np.clip(np.diagonal(inputs.array("grad_gram"), axis1=-2, axis2=-1), 0.0, None))
