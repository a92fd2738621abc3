"""Paired statistics: known values, edge cases and agreement with direct formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from svdcompress import stats


def test_mcnemar_exact_matches_binomial_formula():
    # 10 items: 6 gained, 1 lost, 3 unchanged
    a = [0, 0, 0, 0, 0, 0, 1, 1, 1, 0]
    b = [1, 1, 1, 1, 1, 1, 0, 1, 1, 0]
    result = stats.mcnemar_exact(a, b)
    assert result.extra == {"gained": 6, "lost": 1}
    expected = min(1.0, 2 * sum(math.comb(7, k) for k in range(2)) / 2**7)
    assert result.p_value == pytest.approx(expected)
    assert result.difference == pytest.approx(0.5)
    assert result.ci_low <= result.difference <= result.ci_high
    assert result.test == "mcnemar-exact" and result.n == 10


def test_mcnemar_identical_scores_p_one_and_point_interval():
    result = stats.mcnemar_exact([1, 0, 1], [1, 0, 1])
    assert result.p_value == 1.0
    assert (result.ci_low, result.ci_high) == (0.0, 0.0)


def test_mcnemar_refuses_continuous_scores():
    with pytest.raises(ValueError, match="0/1"):
        stats.mcnemar_exact([0.2, 1.0], [1.0, 0.0])


def test_paired_t_agrees_with_formula():
    rng = np.random.default_rng(0)
    a = rng.uniform(size=50)
    b = a + 0.05 + rng.normal(scale=0.1, size=50)
    result = stats.paired_t(a, b)
    d = b - a
    t = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))
    assert result.extra["t"] == pytest.approx(t)
    assert result.difference == pytest.approx(d.mean())
    assert result.ci_low < d.mean() < result.ci_high
    assert 0 <= result.p_value < 0.05


def test_paired_t_degenerate():
    assert stats.paired_t([0.5, 0.5], [0.5, 0.5]).p_value == 1.0
    assert stats.paired_t([0.5], [0.7]).difference == pytest.approx(0.2)


def test_wilcoxon_detects_shift_and_handles_all_zero():
    rng = np.random.default_rng(1)
    a = rng.uniform(size=40)
    result = stats.wilcoxon(a, a + 0.1)
    assert result.p_value < 1e-6 and result.difference == pytest.approx(0.1)
    assert stats.wilcoxon(a, a).p_value == 1.0


def test_bootstrap_is_deterministic_and_covers_mean():
    rng = np.random.default_rng(2)
    a, b = rng.uniform(size=100), rng.uniform(size=100)
    first = stats.paired_bootstrap_ci(a, b, seed=3)
    assert first == stats.paired_bootstrap_ci(a, b, seed=3)
    assert first[0] < (b - a).mean() < first[1]
    median = stats.paired_bootstrap_ci(a, b, np.median)
    assert median[0] < median[1]


def test_compare_paired_picks_test_and_rejects_bad_input():
    assert stats.compare_paired([0, 1, 1], [1, 1, 0]).test == "mcnemar-exact"
    assert stats.compare_paired([0.1, 0.9, 0.3], [0.2, 0.8, 0.5]).test == "paired-t"
    with pytest.raises(ValueError, match="equal length"):
        stats.compare_paired([1, 0], [1])
    with pytest.raises(ValueError, match="empty"):
        stats.compare_paired([], [])
    assert "pts" in stats.compare_paired([0, 1], [1, 1]).summary()
