"""Activation-guided criteria (MC-Suite section 2.4), from running sums of each expert's outputs.

`n` = hard_counts, the number of tokens an expert processed (its outputs are summed over them).
"""

from __future__ import annotations

import numpy as np

from moe_prune.scoring.linalg import row_sum_minus_diagonal
from moe_prune.scoring.registry import Inputs, criterion

STD_FLOOR = 1e-12  # std of a dimension that never varied (or an expert seen fewer than twice)


@criterion(
    "activation-similarity",
    "mean cosine similarity of the expert's outputs to other experts' outputs (max drops the most redundant)",
    direction="max",
    stats=("act_unit_sum", "hard_counts"),
    source="MC-Suite EAS, eq. 11",
)
def activation_similarity(inputs: Inputs) -> np.ndarray:
    """S[p, q] = mean over output pairs (a in A_p, b in A_q) of cos(a, b) = (U_p / n_p) . (U_q / n_q),
    U = act_unit_sum; score_p = sum_q S[p, q] - S[p, p]. A never-routed expert has mean 0 (similarity 0)."""
    n = inputs.array("hard_counts")[..., None]
    mean_unit = np.divide(inputs.array("act_unit_sum"), n, out=np.zeros_like(inputs.array("act_unit_sum")), where=n > 0)
    return row_sum_minus_diagonal(mean_unit @ np.swapaxes(mean_unit, -1, -2))


@criterion(
    "activation-entropy",
    "sum over hidden dims of log std of the expert's outputs (dominant experts are higher)",
    stats=("act_sum", "act_sumsq", "hard_counts"),
    source="MC-Suite EAE, eq. 12",
)
def activation_entropy(inputs: Inputs) -> np.ndarray:
    """score_p = sum_h log max(std_h, 1e-12), std_h the sample std (n-1) of output dim h over the n_p tokens.

    An expert seen fewer than twice gets std 1e-12 in every dim: the lowest possible score, so `min` drops it first.
    """
    n = inputs.array("hard_counts")[..., None]
    total, squares = inputs.array("act_sum"), inputs.array("act_sumsq")
    mean = np.divide(total, n, out=np.zeros_like(total), where=n > 0)
    var = np.divide(squares - n * mean**2, n - 1, out=np.zeros_like(total), where=n > 1)
    std = np.sqrt(np.clip(var, 0.0, None))
    return np.log(np.maximum(std, STD_FLOOR)).sum(axis=-1)


@criterion(
    "activation-outliers",
    "number of the expert's output elements beyond mean +- 3 std of their own output vector",
    stats=("act_outliers",),
    source="MC-Suite EAO (c = 3)",
)
def activation_outliers(inputs: Inputs) -> np.ndarray:
    """score_p = count of output elements outside mu +- 3 sigma of their vector, summed over tokens (raw count,
    as in the paper: an expert that processes more tokens has more chances to produce outliers)."""
    return inputs.array("act_outliers")


@criterion(
    "activation-norm",
    "sum over hidden dims of the L2 norm over tokens of the expert's outputs (paper: min best)",
    stats=("act_sumsq",),
    source="MC-Suite EAN, eq. 13; Table 1 uses min",
)
def activation_norm(inputs: Inputs) -> np.ndarray:
    """score_p = sum_h ||A_p[:, h]||_2 = sum_h sqrt(sum over tokens of a_h^2)."""
    return np.sqrt(np.clip(inputs.array("act_sumsq"), 0.0, None)).sum(axis=-1)


@criterion(
    "router-weighted-activation-norm",
    "sum over tokens of routing weight x output L2 norm: how much the expert adds to the layer output",
    stats=("act_weighted_norm_sum",),
    source="extra (router-weighted activation norm, as in REAP-style saliency)",
)
def router_weighted_activation_norm(inputs: Inputs) -> np.ndarray:
    """score_p = sum over tokens routed to p of g_p(x) * ||E_p(x)||_2 (g = the routing weight actually applied)."""
    return inputs.array("act_weighted_norm_sum")


@criterion(
    "reap",
    "REAP saliency: mean over the tokens routed to the expert of its top-k-renormalised gate x output L2 norm",
    stats=("act_gate_norm_sum", "hard_counts"),
    source="REAP (Lasby et al. 2025, eq. 9); CerebrasResearch/reap src/reap/observer.py, "
    "MoETransformerObserver._hook_factory (`reap`)",
)
def reap(inputs: Inputs) -> np.ndarray:
    """score_j = (1/|X_j|) sum over x in X_j of g_j(x) * ||f_j(x)||_2, X_j = the tokens whose top-k holds j.

    g_j is the gate the model applied, renormalised over the token's top-k (REAP's observer renormalises
    a softmax of the router logits; with the model's own gate the rule also holds for sigmoid routers).
    An expert no token chose scores 0: min drops it first.
    """
    counts = inputs.array("hard_counts")
    return np.divide(inputs.array("act_gate_norm_sum"), counts, out=np.zeros_like(counts), where=counts > 0)
