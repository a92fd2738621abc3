"""Gradient refinement of low-rank factors: exact objective, never worse, deterministic, safe."""

from __future__ import annotations

import math

import pytest
import torch

from svdcompress import SVDConfig, WhitenConfig, compress_
from svdcompress.errors import CalibrationError, ConfigError
from svdcompress.linalg import Factors, truncated_svd, whitened_svd
from svdcompress.refine import LayerObjective, RefineSettings, optimal_factors, refine_factors


def _layer(seed: int = 0, out: int = 24, inp: int = 16, tokens: int = 200):
    """A weight, original inputs X and drifted inputs X' with correlated channels."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inp, generator=g, dtype=torch.float64)
    mix = torch.randn(inp, inp, generator=g, dtype=torch.float64) * torch.linspace(2, 0.1, inp)
    x = torch.randn(tokens, inp, generator=g, dtype=torch.float64) @ mix
    x_drift = x + 0.3 * torch.randn(tokens, inp, generator=g, dtype=torch.float64)
    return weight, x, x_drift


def _direct_loss(weight, x, x_drift, factors):
    residual = x @ weight.T - x_drift @ factors.product().T
    return (residual.square().sum() / (x @ weight.T).square().sum()).item()


def test_objective_matches_direct_sums_with_and_without_cross():
    weight, x, xd = _layer()
    factors = truncated_svd(weight, 5)
    plain = LayerObjective.from_stats(weight, xd.T @ xd)
    assert plain.value(factors.left, factors.right) == pytest.approx(
        _direct_loss(weight, xd, xd, factors), rel=1e-9)
    cross = LayerObjective.from_stats(weight, xd.T @ xd, x.T @ xd, x.T @ x)
    assert cross.value(factors.left, factors.right) == pytest.approx(
        _direct_loss(weight, x, xd, factors), rel=1e-9)


def test_gradients_match_autograd():
    weight, x, xd = _layer(1)
    objective = LayerObjective.from_stats(weight, xd.T @ xd, x.T @ xd, x.T @ x)
    start = truncated_svd(weight, 4)
    left, right = start.left.clone().requires_grad_(), start.right.clone().requires_grad_()
    residual = x @ weight.T - xd @ (left @ right).T
    (residual.square().sum() / (x @ weight.T).square().sum()).backward()
    _, grad_left, grad_right = objective.value_and_grads(start.left, start.right)
    torch.testing.assert_close(grad_left, left.grad)
    torch.testing.assert_close(grad_right, right.grad)


def test_cross_statistics_need_the_original_gram():
    weight, x, xd = _layer()
    with pytest.raises(ValueError, match="original_gram"):
        LayerObjective.from_stats(weight, xd.T @ xd, x.T @ xd)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refinement_lowers_the_loss_from_plain_svd_towards_the_optimum(seed):
    weight, x, xd = _layer(seed)
    objective = LayerObjective.from_stats(weight, xd.T @ xd, x.T @ xd, x.T @ x)
    start = truncated_svd(weight, 6)
    result = refine_factors(objective, start, RefineSettings(iters=300, lr=1e-2))
    best = objective.value(*_pair(optimal_factors(objective, 6)))
    assert result.error_before**2 == pytest.approx(objective.value(*_pair(start)))
    assert result.error_after**2 == pytest.approx(objective.value(*_pair(result.factors)))
    assert result.error_after < result.error_before
    gap_before, gap_after = result.error_before**2 - best, result.error_after**2 - best
    assert gap_after >= -1e-9 and gap_after < 0.5 * gap_before  # closes most of the gap


def _pair(factors: Factors):
    return factors.left, factors.right


@pytest.mark.parametrize("lr", [1e-4, 1e-2, 1.0])
def test_refinement_never_ends_above_its_start_even_from_the_optimum(lr):
    weight, _, xd = _layer(3)
    objective = LayerObjective.from_stats(weight, xd.T @ xd)
    start = whitened_svd(weight, xd.T @ xd, 5)  # already the exact minimiser of this objective
    result = refine_factors(objective, start, RefineSettings(iters=40, lr=lr))
    assert result.error_after <= result.error_before
    assert objective.value(*_pair(result.factors)) <= objective.value(*_pair(start)) + 1e-12


def test_refinement_is_deterministic():
    weight, x, xd = _layer(4)
    objective = LayerObjective.from_stats(weight, xd.T @ xd, x.T @ xd, x.T @ x)
    runs = [refine_factors(objective, truncated_svd(weight, 5), RefineSettings(iters=50, lr=3e-3))
            for _ in range(2)]
    assert torch.equal(runs[0].factors.left, runs[1].factors.left)
    assert torch.equal(runs[0].factors.right, runs[1].factors.right)


def test_divergence_stops_and_keeps_the_last_good_factors():
    weight, _, xd = _layer(5)
    objective = LayerObjective.from_stats(weight, xd.T @ xd)
    start = truncated_svd(weight, 5)
    result = refine_factors(objective, start, RefineSettings(iters=100, lr=1e3))
    assert result.diverged and result.iters_run < 100
    assert any("diverged" in note and "lower refine_lr" in note for note in result.factors.notes)
    assert math.isfinite(result.error_after) and result.error_after <= result.error_before
    assert torch.isfinite(result.factors.left).all() and torch.isfinite(result.factors.right).all()


def test_nan_statistics_count_as_divergence():
    weight, _, xd = _layer(6)
    gram = xd.T @ xd
    objective = LayerObjective(gram, weight @ gram, float("nan"))  # a broken normaliser
    start = truncated_svd(weight, 3)
    result = refine_factors(objective, start, RefineSettings(iters=5))
    assert result.iters_run <= 1 and result.diverged
    assert any("diverged" in note for note in result.factors.notes)
    # what comes back is finite and exactly the starting factors: nothing NaN-tainted was kept
    assert torch.isfinite(result.factors.left).all() and torch.isfinite(result.factors.right).all()
    assert torch.equal(result.factors.left, start.left) and torch.equal(result.factors.right, start.right)


# --- through compress_ on a tiny model -------------------------------------------------------------


def test_compress_records_refinement_per_module(tiny_llama, tiny_windows, tmp_path):
    config = SVDConfig(param_ratio=0.6, refine_iters=30, refine_lr=1e-2)
    report = compress_(tiny_llama, config, tiny_windows)
    for module in report.modules:
        assert module.refine_steps is not None and module.refine_steps <= 30
        assert module.refine_error_after <= module.refine_error_before
    assert any(m.refine_error_after < 0.99 * m.refine_error_before for m in report.modules)
    saved = report.to_dict()
    assert saved["config"]["refine_iters"] == 30
    assert "refine_error_after" in saved["modules"][0]
    logits = tiny_llama(input_ids=tiny_windows).logits
    assert torch.isfinite(logits).all()
    from svdcompress.report import plot_refinement

    assert plot_refinement(saved["modules"], tmp_path / "refine.png").stat().st_size > 0


def test_refinement_improves_plain_svd_outputs(tiny_windows):
    from conftest import make_tiny_model

    plain = compress_(make_tiny_model("llama"), SVDConfig(param_ratio=0.6), tiny_windows)
    refined = compress_(make_tiny_model("llama"), SVDConfig(param_ratio=0.6, refine_iters=60,
                                                            refine_lr=1e-2), tiny_windows)
    # Output errors are measured on the compressed stream, which differs after the first block;
    # the first block sees identical inputs, so its modules compare like for like.
    first = [(p, r) for p, r in zip(plain.modules, refined.modules, strict=True) if ".0." in p.name]
    assert all(r.output_error < p.output_error for p, r in first)


def test_refinement_needs_calibration(tiny_llama):
    with pytest.raises(CalibrationError, match="refine_iters"):
        compress_(tiny_llama, SVDConfig(param_ratio=0.6, refine_iters=5))


@pytest.mark.parametrize("changes", [
    {"refine_iters": -1}, {"refine_iters": 2.5}, {"refine_lr": 0.0}, {"refine_lr": float("nan")},
    {"refine_lr": -1e-3},
])
def test_bad_refinement_settings_are_refused(changes):
    with pytest.raises(ConfigError):
        WhitenConfig(param_ratio=0.8, **changes)


# --- the statistics refinement reads --------------------------------------------------------------


def _inputs(model, names, windows):
    """Each named module's inputs (tokens, in) over ``windows``, by direct hooks."""
    seen: dict[str, list] = {}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda _m, args, _o, n=n: seen.setdefault(n, []).append(args[0].reshape(-1, args[0].shape[-1]).double()))
        for n in names
    ]
    with torch.no_grad():
        model(input_ids=windows)
    for handle in handles:
        handle.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


@pytest.mark.parametrize("seed", range(4))
def test_pipeline_statistics_match_direct_sums(seed):
    """gram, cross and original_gram equal Σ x'x'ᵀ, Σ x x'ᵀ, Σ x xᵀ (a stale-cache bug once mixed
    up inputs of equal shape whose memory had been reused within a batch)."""
    import copy

    from conftest import make_tiny_model

    from svdcompress.calibration import Calibration, run_sequential
    from svdcompress.modules import LowRankLinear
    from svdcompress.targets import find_targets

    model = make_tiny_model("llama")
    original = copy.deepcopy(model)
    windows = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(seed))
    targets = [t for t in find_targets(model, ("all-linear",)) if t.block <= 1]
    stats = {}

    def compress_block(_index, block_stats):
        for name, entry in block_stats.items():
            stats[name] = entry
            module = model.get_submodule(name)
            factors = truncated_svd(module.weight.detach(), 8)
            model.set_submodule(name, LowRankLinear.from_linear(
                module, Factors(factors.left.float(), factors.right.float())))

    run_sequential(model, targets, Calibration(windows), compress_block, batch_size=2,
                   track_original=True)
    # Block i's statistics are gathered before block i is compressed: compare with a model whose
    # earlier blocks are compressed and block i is still dense.
    half = copy.deepcopy(original)
    for target in targets:
        if target.block == 0:
            half.set_submodule(target.name, copy.deepcopy(model.get_submodule(target.name)))
    names = [t.name for t in targets]
    xo = _inputs(original, names, windows)
    xc = {**{n: xo[n] for n in names if ".0." in n}, **_inputs(half, names, windows)}
    for name in names:
        x_c = xo[name] if ".0." in name else xc[name]
        torch.testing.assert_close(stats[name].gram, x_c.T @ x_c, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(stats[name].cross, xo[name].T @ x_c, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(stats[name].original_gram, xo[name].T @ xo[name], rtol=1e-4,
                                   atol=1e-3)
