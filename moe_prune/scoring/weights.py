"""Weight-guided criteria (MC-Suite section 2.2): need only the checkpoint (`--model`), no statistics.

Math in float32 per tensor, accumulated in float64; one MoE layer's experts in memory at a time.
"""

from __future__ import annotations

import numpy as np
import torch

from moe_prune.scoring.linalg import cosine_from_gram, row_sum_minus_diagonal
from moe_prune.scoring.registry import Inputs, criterion, stack_layers


def _gram(inputs: Inputs) -> np.ndarray:
    """`[L, E, E]` Gram matrix of each expert's flattened, concatenated weights (accumulated tensor by tensor)."""
    assert inputs.weights is not None
    grams = []
    for layer in inputs.weights:
        gram = np.zeros((layer.router.shape[0],) * 2)
        for flat in layer.flat():
            gram += (flat @ flat.T).double().numpy()
        grams.append(gram)
    return stack_layers(grams, inputs.shape[1])


@criterion(
    "weight-similarity",
    "mean cosine similarity of the expert's flattened weights to the other experts' (max drops the most redundant)",
    direction="max",
    weights=True,
    source="MC-Suite EWS, eq. 3",
)
def weight_similarity(inputs: Inputs) -> np.ndarray:
    """score_p = sum_q cos(flatten W_p, flatten W_q) - cos(W_p, W_p), W_p = all of expert p's tensors concatenated."""
    return row_sum_minus_diagonal(cosine_from_gram(_gram(inputs)))


@criterion(
    "weight-norm",
    "L2 norm of all the expert's weights",
    direction="min",
    weights=True,
    source="MC-Suite EWN, eq. 6",
)
def weight_norm(inputs: Inputs) -> np.ndarray:
    """score_p = ||flatten W_p||_2 over every tensor of expert p (biases included)."""
    return np.sqrt(np.diagonal(_gram(inputs), axis1=-2, axis2=-1))


@criterion(
    "router-weight-norm",
    "L2 norm of the expert's router row (the paper finds max best)",
    direction="max",
    weights=True,
    source="MC-Suite RWN, eq. 4; Table 1 uses max",
)
def router_weight_norm(inputs: Inputs) -> np.ndarray:
    """score_p = ||W_G[p, :]||_2, the router weight row of expert p (router bias not included)."""
    assert inputs.weights is not None
    return stack_layers([layer.router.norm(dim=1).double().numpy() for layer in inputs.weights], inputs.shape[1])


@criterion(
    "stable-rank",
    "stable rank sum(sigma^2)/sigma_1^2 of the expert's weight matrices, averaged (dominant experts are lower)",
    direction="max",
    weights=True,
    source="MC-Suite WSR, eq. 5",
)
def stable_rank(inputs: Inputs) -> np.ndarray:
    """score_p = mean over expert p's 2-D matrices M of ||M||_F^2 / sigma_1(M)^2 (0 for an all-zero matrix).

    Matrices are taken as stored on disk: a fused `gate_up_proj` counts as one matrix, while the
    per-expert layout stores gate and up separately, so values (not usually rankings) can differ
    between the two layouts of the same model. Biases are not matrices and are skipped.
    """
    assert inputs.weights is not None
    layers = []
    for layer in inputs.weights:
        ranks = []
        for matrices in layer.matrices():
            sigma = torch.linalg.svdvals(matrices)  # [E, min(rows, cols)], descending
            top = sigma[:, 0] ** 2
            total = (sigma**2).sum(dim=1)
            ranks.append(torch.where(top > 0, total / top.clamp_min(1e-30), torch.zeros_like(top)).double().numpy())
        layers.append(np.mean(ranks, axis=0) if ranks else np.zeros(layer.router.shape[0]))
    return stack_layers(layers, inputs.shape[1])
