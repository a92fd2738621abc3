"""The linear algebra, checked against its definitions."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from svdcompress import linalg

shapes = st.tuples(st.integers(2, 24), st.integers(2, 24))


def _random(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16), data=st.data())
def test_truncation_error_is_energy_of_dropped_singular_values(shape, seed, data):
    weight = _random(shape, seed)
    rank = data.draw(st.integers(1, min(shape)))
    factors = linalg.truncated_svd(weight, rank)
    sigma = torch.linalg.svdvals(weight)
    dropped = sigma[rank:].pow(2).sum().sqrt()
    assert (weight - factors.product()).norm() == pytest.approx(dropped.item(), rel=1e-8, abs=1e-10)
    assert factors.left.shape == (shape[0], rank) and factors.right.shape == (rank, shape[1])


@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_full_rank_reconstructs_for_every_method(shape, seed):
    weight = _random(shape, seed)
    full = min(shape)
    x = _random((64, shape[1]), seed + 1)
    gram = x.T @ x
    candidates = [
        linalg.truncated_svd(weight, full),
        linalg.whitened_svd(weight, gram, full),
        linalg.scaled_svd(weight, x.abs().mean(0).sqrt(), full),
        linalg.fisher_weighted_svd(weight, torch.rand(shape[0], dtype=torch.float64) + 0.1, full),
        linalg.select_by_importance(weight, torch.rand(full, dtype=torch.float64), full),
    ]
    for factors in candidates:
        torch.testing.assert_close(factors.product(), weight, rtol=1e-6, atol=1e-8)


@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16), data=st.data())
def test_whitening_minimises_output_error(shape, seed, data):
    """SVD-LLM's claim: at equal rank, whitened SVD has no larger ‖(W − W')X‖ than plain SVD."""
    weight = _random(shape, seed)
    x = _random((48, shape[1]), seed + 1) * torch.linspace(0.1, 3, shape[1], dtype=torch.float64)
    gram = x.T @ x
    rank = data.draw(st.integers(1, min(shape)))
    plain = linalg.truncated_svd(weight, rank).product()
    white = linalg.whitened_svd(weight, gram, rank).product()
    err_plain = linalg.relative_output_error(weight, plain, gram)
    err_white = linalg.relative_output_error(weight, white, gram)
    assert err_white <= err_plain + 1e-9


def test_relative_output_error_matches_direct_computation():
    weight, approx = _random((6, 5), 0), _random((6, 5), 1)
    x = _random((30, 5), 2)
    direct = ((x @ (weight - approx).T).norm() / (x @ weight.T).norm()).item()
    assert linalg.relative_output_error(weight, approx, x.T @ x) == pytest.approx(direct, rel=1e-6)
    # float32 products on a float64 difference: accurate relative to the error, however small
    close = weight + 1e-9 * approx
    direct = ((x @ (weight - close).T).norm() / (x @ weight.T).norm()).item()
    assert linalg.relative_output_error(weight, close, x.T @ x) == pytest.approx(direct, rel=1e-5)


def test_whitening_survives_singular_gram():
    x = _random((3, 8), 0)  # 3 samples in 8 dimensions: rank-3 Gram, 5 zero eigenvalues
    white = linalg.whitening(x.T @ x)
    assert white.n_clamped == 5
    assert torch.isfinite(white.s_inv).all()
    for shape in [(4, 8), (10, 8)]:  # wide: no eigendecomposition of G; tall: G clamped
        factors = linalg.whitened_svd(_random(shape, 1), x.T @ x, 2)
        assert torch.isfinite(factors.left).all() and torch.isfinite(factors.right).all()
        assert any("clamped" in note for note in factors.notes) is (shape == (10, 8))


def test_whitening_survives_indefinite_gram():
    gram = torch.diag(torch.tensor([1.0, 0.5, -1e-9, 0.0], dtype=torch.float64))
    white = linalg.whitening(gram)
    assert white.n_clamped == 2
    torch.testing.assert_close(white.s @ white.s_inv, torch.eye(4, dtype=torch.float64))


def test_importance_selection_keeps_the_highest_scores_not_the_largest_sigma():
    weight = torch.diag(torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64))
    factors = linalg.select_by_importance(weight, torch.tensor([0.0, 0.1, 9.0]), 1)
    torch.testing.assert_close(factors.product(), torch.diag(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)))


def test_least_squares_left_is_optimal_and_recovers_exact_targets():
    weight = _random((6, 8), 0)
    x = _random((100, 8), 1)
    right = linalg.truncated_svd(weight, 3).right
    left = linalg.least_squares_left(weight, right, x.T @ x, damping=0)
    err = linalg.relative_output_error(weight, left @ right, x.T @ x)
    svd_err = linalg.relative_output_error(weight, linalg.truncated_svd(weight, 3).product(), x.T @ x)
    assert err <= svd_err + 1e-12
    # A perturbation of the optimum can only make the output error worse.
    worse = linalg.relative_output_error(weight, (left + 1e-3 * _random(left.shape, 5)) @ right, x.T @ x)
    assert worse >= err


@pytest.mark.parametrize(("out", "inp"), [(576, 576), (192, 576), (1536, 576), (3, 5)])
def test_break_even_rank_is_the_last_rank_that_saves(out, inp):
    r = linalg.break_even_rank(out, inp)
    assert linalg.factored_params(out, inp, r) < out * inp
    assert linalg.factored_params(out, inp, r + 1) >= out * inp


@pytest.mark.parametrize("shape", [(6, 20), (20, 6), (8, 8)])  # wide: eigh of W G Wᵀ; tall/square: of G
def test_whitened_svd_is_the_best_rank_r_fit_in_the_whitened_norm(shape):
    weight = _random(shape, 0)
    x = _random((50, shape[1]), 1) * torch.linspace(0.1, 3, shape[1], dtype=torch.float64)
    gram = x.T @ x
    gram[3, 1] += 1e-9  # the two triangles of a blocked XᵀX can differ; the lower one counts
    given = gram.clone()
    symmetric = gram.tril() + gram.tril(-1).T
    eigvals, eigvecs = torch.linalg.eigh(symmetric)
    s = eigvecs * eigvals.sqrt()
    u, sigma, vh = torch.linalg.svd(weight @ s)
    best = (u[:, :3] * sigma[:3]) @ vh[:3] @ torch.linalg.inv(s)
    factors = linalg.whitened_svd(weight, gram, 3)
    wide = shape[0] < shape[1]
    assert linalg.needs_gram_eigen(weight.shape) is not wide
    # The wide path's ridge (1e-6·λmax) moves the factors in the least excited directions by about
    # δ/λ (1e-3 here), and the output error only at second order.
    tolerance = 1e-4 if wide else 1e-9
    torch.testing.assert_close(factors.product(), best, rtol=tolerance, atol=tolerance / 10)
    error = linalg.relative_output_error(weight, factors.product(), symmetric)
    assert error == pytest.approx(linalg.relative_output_error(weight, best, symmetric), rel=tolerance / 100)
    # decomposed in place and given back exactly symmetric, or (wide) never touched
    assert torch.equal(gram, given if wide else symmetric)
    torch.testing.assert_close(factors.left.norm(dim=0), sigma[:3].sqrt(), rtol=tolerance, atol=0)  # U√Σ


def test_wide_whitened_svd_spends_rank_beyond_the_data_on_the_weight_itself():
    """2 calibration tokens, rank 4: the ridge gives the 2 directions the data never excites
    W's own energy (as the clamp does on the tall path) rather than zero factors."""
    weight, x = _random((6, 20), 0), _random((2, 20), 1)
    errors = []
    for rank in (2, 4):
        factors = linalg.whitened_svd(weight, x.T @ x, rank)
        assert torch.isfinite(factors.left).all() and torch.isfinite(factors.right).all()
        assert (factors.left.norm(dim=0) > 0).all()
        assert linalg.relative_output_error(weight, factors.product(), x.T @ x) < 1e-3  # ≈ exact on the data
        errors.append(linalg.relative_weight_error(weight, factors.product()))
    assert errors[1] < errors[0] - 0.2
