"""``WhitenConfig(error_blend=β)``: each layer fits W((1−β)x' + βx) from the drifted inputs x'."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

import svdcompress as sc
from svdcompress.config import config_from_dict
from svdcompress.errors import ConfigError
from svdcompress.linalg import blended_target, whitened_svd


def _streams(tokens: int = 400, inp: int = 12, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    original = torch.randn(tokens, inp, generator=generator, dtype=torch.float64)
    drifted = original + 0.3 * torch.randn(tokens, inp, generator=generator, dtype=torch.float64)
    return original, drifted


def test_blended_target_is_the_least_squares_map_to_the_blended_outputs():
    x, x_drift = _streams()
    weight = torch.randn(8, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    beta = 0.4
    target = ((1 - beta) * x_drift + beta * x) @ weight.T  # (tokens, out)
    expected = torch.linalg.lstsq(x_drift, target).solution.T  # (out, in)
    got = blended_target(weight, x_drift.T @ x_drift, x.T @ x_drift, beta, damping=0.0)
    assert torch.allclose(got, expected, atol=1e-8)
    assert torch.equal(blended_target(weight, x_drift.T @ x_drift, x.T @ x_drift, 0.0), weight)


def test_whitened_truncation_of_the_blended_target_beats_plain_whitening_on_its_objective():
    x, x_drift = _streams()
    weight = torch.randn(8, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    gram, cross, beta, rank = x_drift.T @ x_drift, x.T @ x_drift, 0.5, 3
    target = ((1 - beta) * x_drift + beta * x) @ weight.T

    def loss(factors):
        return (target - x_drift @ factors.product().T).pow(2).sum().item()

    blended = whitened_svd(blended_target(weight, gram, cross, beta, damping=0.0), gram, rank)
    plain = whitened_svd(weight, gram, rank)
    assert loss(blended) < loss(plain)
    for seed in range(5):  # no other rank-3 map does better (random perturbations of the optimum)
        noise = torch.randn(8, 12, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        other = whitened_svd(blended.product() + 1e-3 * noise, gram, rank)
        assert loss(blended) <= loss(other) + 1e-9


def test_error_blend_is_a_whiten_setting_that_tracks_the_original_stream(tiny_windows):
    assert not sc.WhitenConfig(param_ratio=0.7).tracks_original
    assert sc.WhitenConfig(param_ratio=0.7, error_blend=0.3).tracks_original
    with pytest.raises(ConfigError, match="error_blend"):
        sc.WhitenConfig(param_ratio=0.7, error_blend=1.5)
    logits = {}
    for beta in (0.0, 0.5):
        model = make_tiny_model("llama")
        sc.compress_(model, sc.WhitenConfig(param_ratio=0.7, storage="pivoted", error_blend=beta),
                     tiny_windows)
        with torch.no_grad():
            logits[beta] = model(tiny_windows).logits
    assert torch.isfinite(logits[0.5]).all()
    assert not torch.allclose(logits[0.0], logits[0.5])
    config = sc.WhitenConfig(param_ratio=0.7, error_blend=0.5)
    assert config_from_dict(config.to_dict()) == config  # recipes carry it
