"""Paired statistics for comparing two models on the same items (pure functions, no I/O).

Every function takes two equally long sequences of per-item scores on the *same* items, ``a``
(the baseline, e.g. the original model) and ``b`` (the candidate, e.g. a compressed model), and
reports ``difference = mean(b) − mean(a)`` with a 95 % confidence interval and a two-sided p-value:

- :func:`mcnemar_exact`: 0/1 scores (accuracy). Exact McNemar test = two-sided binomial test on the
  discordant items (``gained``: a wrong, b right; ``lost``: a right, b wrong); the interval is the
  paired bootstrap interval of the accuracy difference.
- :func:`paired_t`: continuous scores (e.g. TruthfulQA MC2's probability mass on true answers).
  Student's paired t-test; the interval is the t interval of the mean difference.
- :func:`wilcoxon`: continuous scores, rank-based (Wilcoxon signed-rank, zero differences dropped);
  robust to outliers but tests the median shift, so its interval is the paired bootstrap interval
  of the mean difference.
- :func:`paired_bootstrap_ci`: percentile bootstrap interval of any paired statistic (items
  resampled together, so the pairing is kept).
- :func:`compare_paired`: picks McNemar for 0/1 scores and the paired t-test otherwise.

The statistics are scipy's (``scipy.stats.binomtest``, ``ttest_rel``, ``wilcoxon``, ``bootstrap``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "PairedComparison",
    "compare_paired",
    "is_binary",
    "mcnemar_exact",
    "paired_bootstrap_ci",
    "paired_t",
    "wilcoxon",
]

CONFIDENCE = 0.95
N_RESAMPLES = 10_000


@dataclass(frozen=True)
class PairedComparison:
    """Result of a paired comparison of b against a on the same ``n`` items."""

    test: str  # "mcnemar-exact", "paired-t" or "wilcoxon"
    n: int
    mean_a: float
    mean_b: float
    difference: float  # mean(b) - mean(a)
    ci_low: float
    ci_high: float
    p_value: float
    confidence: float = CONFIDENCE
    extra: dict[str, Any] = field(default_factory=dict)  # test-specific counts (gained, lost, ...)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """``+2.3 pts [−1.0, +5.6], p=0.17 (mcnemar-exact, n=300)``; scores shown ×100."""
        return (
            f"{100 * self.difference:+.1f} pts [{100 * self.ci_low:+.1f}, {100 * self.ci_high:+.1f}], "
            f"p={self.p_value:.2g} ({self.test}, n={self.n})"
        )


def _pair(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(
            f"paired scores must be two 1-d sequences of equal length, got {x.shape} and {y.shape}"
        )
    if x.size == 0:
        raise ValueError("paired scores are empty: nothing to compare")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("paired scores hold NaN or inf")
    return x, y


def is_binary(scores: Sequence[float]) -> bool:
    """True when every score is 0 or 1 (an accuracy), so McNemar applies."""
    values = np.asarray(scores, dtype=np.float64)
    return bool(np.isin(values, (0.0, 1.0)).all())


def paired_bootstrap_ci(
    a: Sequence[float],
    b: Sequence[float],
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(b − a)`` (items resampled as pairs).

    ``statistic`` maps the per-item differences to one number (default: their mean, i.e. the
    difference of the two means). Deterministic for a given ``seed``. When every difference is the
    same, the interval is that single value.
    """
    from scipy.stats import bootstrap

    x, y = _pair(a, b)
    diffs = y - x
    if np.all(diffs == diffs[0]):
        value = float(statistic(diffs))
        return value, value
    result = bootstrap(
        (diffs,),
        statistic,
        confidence_level=confidence,
        n_resamples=n_resamples,
        method="percentile",
        vectorized=False,
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def mcnemar_exact(
    a: Sequence[float], b: Sequence[float], *, confidence: float = CONFIDENCE, seed: int = 0
) -> PairedComparison:
    """Exact McNemar test for 0/1 scores: binomial test of ``gained`` vs ``lost`` at p = 1/2.

    ``extra`` holds ``gained`` (a wrong, b right) and ``lost`` (a right, b wrong). The interval is
    :func:`paired_bootstrap_ci` of the accuracy difference. Raises ``ValueError`` on scores other
    than 0/1.
    """
    from scipy.stats import binomtest

    x, y = _pair(a, b)
    if not (is_binary(x) and is_binary(y)):
        raise ValueError("mcnemar_exact needs 0/1 scores; use paired_t or wilcoxon otherwise")
    gained = int(np.sum((x == 0) & (y == 1)))
    lost = int(np.sum((x == 1) & (y == 0)))
    discordant = gained + lost
    p = binomtest(gained, discordant, 0.5).pvalue if discordant else 1.0
    low, high = paired_bootstrap_ci(x, y, confidence=confidence, seed=seed)
    return PairedComparison(
        "mcnemar-exact", x.size, float(x.mean()), float(y.mean()), float(y.mean() - x.mean()),
        low, high, float(p), confidence, {"gained": gained, "lost": lost},
    )


def paired_t(
    a: Sequence[float], b: Sequence[float], *, confidence: float = CONFIDENCE
) -> PairedComparison:
    """Student's paired t-test of mean(b − a) = 0, with the t interval of the mean difference.

    With fewer than two items, or all differences equal, the p-value is 1 when the difference is 0
    and 0 otherwise, and the interval is the difference itself.
    """
    from scipy.stats import ttest_rel

    x, y = _pair(a, b)
    diffs = y - x
    mean = float(diffs.mean())
    if x.size < 2 or np.all(diffs == diffs[0]):
        return PairedComparison(
            "paired-t", x.size, float(x.mean()), float(y.mean()), mean, mean, mean,
            1.0 if mean == 0 else 0.0, confidence, {"degenerate": True},
        )
    result = ttest_rel(y, x)
    interval = result.confidence_interval(confidence_level=confidence)
    return PairedComparison(
        "paired-t", x.size, float(x.mean()), float(y.mean()), mean,
        float(interval.low), float(interval.high), float(result.pvalue), confidence,
        {"t": float(result.statistic), "df": int(result.df)},
    )


def wilcoxon(
    a: Sequence[float], b: Sequence[float], *, confidence: float = CONFIDENCE, seed: int = 0
) -> PairedComparison:
    """Wilcoxon signed-rank test of b − a (zero differences dropped), two-sided.

    The interval is :func:`paired_bootstrap_ci` of the mean difference. When every difference is
    zero the p-value is 1.
    """
    from scipy.stats import wilcoxon as scipy_wilcoxon

    x, y = _pair(a, b)
    diffs = y - x
    nonzero = int(np.count_nonzero(diffs))
    if nonzero == 0:
        p, statistic = 1.0, float("nan")
    else:
        result = scipy_wilcoxon(diffs, zero_method="wilcox", alternative="two-sided")
        p, statistic = float(result.pvalue), float(result.statistic)
    low, high = paired_bootstrap_ci(x, y, confidence=confidence, seed=seed)
    return PairedComparison(
        "wilcoxon", x.size, float(x.mean()), float(y.mean()), float(diffs.mean()), low, high, p,
        confidence, {"nonzero_differences": nonzero, "statistic": statistic},
    )


def compare_paired(
    a: Sequence[float], b: Sequence[float], *, confidence: float = CONFIDENCE
) -> PairedComparison:
    """McNemar (exact) when both score lists are 0/1, else the paired t-test."""
    if is_binary(a) and is_binary(b):
        return mcnemar_exact(a, b, confidence=confidence)
    return paired_t(a, b, confidence=confidence)
