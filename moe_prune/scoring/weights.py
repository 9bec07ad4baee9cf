"""Weight-guided criteria (MC-Suite section 2.2): need only the checkpoint (`--model`), no statistics.

Math in float32 per read, accumulated in float64. Weights are read in bounded pieces (`LayerWeights.chunks` /
`expert` / `matrices`), never as a layer's float32 stack, so score stays within issue #24's memory contract.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from moe_prune.scoring.linalg import cosine_from_gram, row_sum_minus_diagonal
from moe_prune.scoring.registry import Inputs, criterion, stack_layers

if TYPE_CHECKING:
    from moe_prune.checkpoint.expert_weights import LayerWeights


def _gram(inputs: Inputs) -> np.ndarray:
    """`[L, E, E]` Gram matrix of each expert's flattened, concatenated weights, summed over row chunks of every
    expert (G = sum over chunks of C C^T: each weight read once, the working set one chunk)."""
    assert inputs.weights is not None
    grams = []
    for layer in inputs.weights:
        gram = np.zeros((layer.router.shape[0],) * 2)
        for chunk in layer.chunks():
            gram += (chunk @ chunk.T).double().numpy()
            del chunk  # else held while the generator builds the next one: two chunks, twice the bound
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
    """score_p = ||flatten W_p||_2 over every tensor of expert p (biases included), read one expert at a time."""
    assert inputs.weights is not None
    layers = []
    for layer in inputs.weights:
        squares = [sum(float(part.double().square().sum()) for part in layer.expert(e)) for e in range(len(layer))]
        layers.append(np.sqrt(squares))
    return stack_layers(layers, inputs.shape[1])


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
    return stack_layers([_stable_ranks(layer) for layer in inputs.weights], inputs.shape[1])


def _stable_ranks(layer: LayerWeights) -> np.ndarray:
    """`[E]` mean stable rank of each expert's matrices, one matrix of one expert in memory at a time."""
    experts = []
    for e in range(len(layer)):
        ranks = []
        for matrix in layer.matrices(e):
            sigma = torch.linalg.svdvals(matrix)  # descending
            top, total = sigma[0] ** 2, (sigma**2).sum()  # float32, as the ratio always was
            ranks.append(float(total / top.clamp_min(1e-30)) if top > 0 else 0.0)
        experts.append(np.mean(ranks) if ranks else 0.0)
    return np.asarray(experts)
