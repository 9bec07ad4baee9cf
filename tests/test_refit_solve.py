"""`merging.refit`'s solver and checks against independent float64 paths (the survivors of the mutation run).

The ridge solution is checked against ridge regression written as an augmented least-squares problem
(`np.linalg.lstsq` on the weighted activations stacked over sqrt(lambda s) I), which never forms hh; the
eigen path against `least_squares_down` at every candidate ridge; the refusals by their one-line message.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_prune.architectures.spec import ExpertTensor
from moe_prune.errors import MoePruneError
from moe_prune.merging.refit import (
    RIDGES,
    candidate_errors,
    check_layer,
    check_layouts,
    down_tensor,
    eigen_fit,
    least_squares_down,
    ridge_solution,
)

NEVER = "--refit: the expert never produced an activation on the calibration data"


def sums(seed: int, tokens: int = 300, inner: int = 6, hidden: int = 4, size: float = 1.0):
    """Weighted activations h [T, I], targets y [T, H], weights p [T] and their sums hh, hy."""
    rng = np.random.default_rng(seed)
    h, y, p = size * rng.normal(size=(tokens, inner)), rng.normal(size=(tokens, hidden)), rng.uniform(size=tokens)
    return h, y, p, (h * p[:, None]).T @ h, (h * p[:, None]).T @ y


def augmented_ridge(h, y, p, ridge: float) -> np.ndarray:
    """argmin sum_x p ||D h - y||^2 + ridge s ||D||^2, s = mean_i sum_x p h_i^2, by least squares on stacked rows."""
    inner = h.shape[1]
    scale = float((p[:, None] * h * h).sum() / inner)
    rows = np.vstack([h * np.sqrt(p)[:, None], np.sqrt(ridge * scale) * np.eye(inner)])
    targets = np.vstack([y * np.sqrt(p)[:, None], np.zeros((inner, y.shape[1]))])
    return np.linalg.lstsq(rows, targets, rcond=None)[0]


@pytest.mark.parametrize("ridge", [1e-6, 0.1, 10.0])
@pytest.mark.parametrize("size", [1e-3, 1.0, 30.0])
def test_ridge_term_equals_an_augmented_least_squares(ridge, size):
    """The ridge is added (not subtracted), in units of the mean diagonal, at activations small and large."""
    h, y, p, hh, hy = sums(1, size=size)
    want = augmented_ridge(h, y, p, ridge)
    np.testing.assert_allclose(least_squares_down(hh, hy, ridge), want, rtol=1e-7, atol=1e-12 * np.abs(want).max())


def test_the_gram_is_symmetrised_before_solving():
    """Sums accumulated with rounding are not exactly symmetric: the solve uses (hh + hh^T) / 2."""
    h, y, p, hh, hy = sums(2)
    skew = np.triu(np.full_like(hh, 0.3), 1)
    want = augmented_ridge(h, y, p, 0.01)
    np.testing.assert_allclose(least_squares_down(hh + skew - skew.T, hy, 0.01), want, rtol=1e-7)


@pytest.mark.parametrize("ridge", RIDGES)
def test_eigen_path_equals_the_direct_solve_at_every_candidate(ridge):
    """One eigendecomposition gives every candidate's solution, also for activations whose eigenvalues are < 1."""
    h, y, p, hh, hy = sums(3, size=0.05)
    q, values, rotated, scale = eigen_fit(torch.from_numpy(hh), torch.from_numpy(hy))
    assert scale == pytest.approx(np.trace(hh) / hh.shape[0], rel=1e-12)
    got = ridge_solution(q, values, rotated, scale, ridge)
    np.testing.assert_allclose(got, augmented_ridge(h, y, p, ridge), rtol=1e-6, atol=1e-10)


def test_candidate_errors_equal_the_held_out_residuals():
    """sum_x p ||D_lambda^T h - y||^2 on rows the sums never saw, for every ridge, against numpy."""
    _, _, _, hh, hy = sums(4)
    h, y, p, _, _ = sums(5, tokens=40)
    q, values, rotated, scale = eigen_fit(torch.from_numpy(hh), torch.from_numpy(hy))
    g = torch.from_numpy(h) @ q
    got = candidate_errors(g, torch.from_numpy(p)[:, None], torch.from_numpy(y), values, rotated, scale)
    for i, ridge in enumerate(RIDGES):
        residual = h @ least_squares_down(hh, hy, ridge) - y
        assert float(got[i]) == pytest.approx(float((p * (residual**2).sum(1)).sum()), rel=1e-9)


@pytest.mark.parametrize(
    "hh",
    [np.zeros((4, 4)), np.full((4, 4), np.nan), -np.eye(4), np.zeros((0, 0))],
    ids=["silent", "nan", "negative", "empty"],
)
def test_an_expert_that_never_fired_is_refused_by_both_solvers(hh):
    hy = np.ones((hh.shape[0], 3))
    with pytest.raises(MoePruneError, match=NEVER):
        least_squares_down(hh, hy)
    with pytest.raises(MoePruneError, match=NEVER):
        eigen_fit(torch.from_numpy(hh), torch.from_numpy(hy))


def test_a_barely_active_expert_is_solved_not_refused():
    """A tiny mean diagonal (1e-8) is an expert that fired, if weakly: solved by both paths alike."""
    h, y, p, hh, hy = sums(6, size=1e-4)
    want = augmented_ridge(h, y, p, 1e-3)
    np.testing.assert_allclose(least_squares_down(hh, hy, 1e-3), want, rtol=1e-6)
    q, values, rotated, scale = eigen_fit(torch.from_numpy(hh), torch.from_numpy(hy))
    np.testing.assert_allclose(ridge_solution(q, values, rotated, scale, 1e-3), want, rtol=1e-6)


PLAIN = {
    "gate_proj.weight": ExpertTensor("gate_proj.weight", 0),
    "down_proj.weight": ExpertTensor("down_proj.weight", 1),
}


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"down_proj_bias": ExpertTensor("down_proj_bias", None)}, "['down_proj_bias']"),
        ({"up_bias": ExpertTensor("up_proj.bias", 0)}, "['up_bias']"),
    ],
    ids=["no-axis", "bias-suffix"],
)
def test_biased_experts_are_refused_naming_the_tensor(extra, named):
    """A bias is refused whether its layout has no intermediate axis or only its name says bias."""
    message = f"layer 3: --refit fits the down projection without a bias; these experts have {named}"
    with pytest.raises(MoePruneError) as raised:
        check_layouts({**PLAIN, **extra}, "layer 3")
    assert str(raised.value) == message


def test_layouts_without_a_known_down_tensor_are_refused():
    check_layouts(PLAIN, "layer 0")  # unbiased, with a down projection: accepted
    with pytest.raises(MoePruneError, match="layer 1: --refit does not know which expert tensor is the down proj"):
        check_layouts({"gate_proj.weight": ExpertTensor("gate_proj.weight", 0)}, "layer 1")


@pytest.mark.parametrize(("axis", "shape"), [(0, (6, 4)), (1, (4, 6))])
def test_down_tensor_follows_the_stored_orientation(axis, shape):
    """D^T [I, H] is written as stored: [I, H] when the intermediate axis is 0, transposed when it is 1."""
    down_t = np.arange(24, dtype=np.float64).reshape(6, 4)
    layout = ExpertTensor("down_proj", axis)
    got = down_tensor(down_t, layout)
    assert got.dtype == torch.float32 and tuple(got.shape) == shape
    assert torch.equal(got, torch.from_numpy(down_t if axis == 0 else down_t.T.copy()).float())
    check_layer({"down_proj": layout}, {"down_proj": shape}, down_t, "layer 2")
    wrong = shape[::-1]
    message = f"layer 2: --refit statistics fit a down projection of shape {shape}; down_proj is {wrong}"
    with pytest.raises(MoePruneError) as raised:
        check_layer({"down_proj": layout}, {"down_proj": wrong}, down_t, "layer 2")
    assert str(raised.value) == message
