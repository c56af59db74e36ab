"""Hypothesis tests, corrections and power from estimates: the formulas, vectorised over comparisons.

Kept apart from the estimators (which turn sums into means and variances) and from the results
document (which decides what to test), so each formula lives in exactly one place and the
validation tests can check it against scipy and statsmodels directly.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import stats

Array = NDArray[np.float64]

SRM_THRESHOLD = 0.001


def welch_df(var_mean_a: Array, n_a: Array, var_mean_b: Array, n_b: Array) -> Array:
    """Welch-Satterthwaite degrees of freedom from the variances of two means."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (var_mean_a + var_mean_b) ** 2 / (var_mean_a**2 / (n_a - 1) + var_mean_b**2 / (n_b - 1))


def quantile(level: Array, df: Array) -> Array:
    """Upper quantile of the t distribution with `df` (normal where df is infinite)."""
    finite = np.isfinite(df)
    safe_df = np.where(finite & (df > 0), df, 1.0)
    return np.where(finite, stats.t.isf(level, safe_df), stats.norm.isf(level))


def normal_equivalent(statistic: Array, df: Array) -> Array:
    """The z value with the same tail probability as a t statistic (z itself where df is infinite).

    Group-sequential bounds live on the normal scale; comparing a Welch t statistic with them
    directly would be slightly anti-conservative at small samples, so it is mapped first.
    """
    finite = np.isfinite(df)
    safe_df = np.where(finite & (df > 0), df, 1.0)
    return np.where(finite, stats.norm.isf(stats.t.sf(statistic, safe_df)), statistic)


def t_equivalent(z: Array, df: Array) -> Array:
    """The t value with the same tail probability as the normal value `z` (inverse of the above)."""
    finite = np.isfinite(df)
    safe_df = np.where(finite & (df > 0), df, 1.0)
    return np.where(finite, stats.t.isf(stats.norm.sf(z), safe_df), z)


def p_values(statistic: Array, df: Array, alternative: NDArray[np.str_]) -> Array:
    """p-values for 'two-sided', 'greater' or 'less' alternatives (t with df, normal if df infinite)."""
    finite = np.isfinite(df)
    safe_df = np.where(finite & (df > 0), df, 1.0)
    upper = np.where(finite, stats.t.sf(statistic, safe_df), stats.norm.sf(statistic))
    lower = np.where(finite, stats.t.cdf(statistic, safe_df), stats.norm.cdf(statistic))
    two = np.where(finite, 2 * stats.t.sf(np.abs(statistic), safe_df), 2 * stats.norm.sf(np.abs(statistic)))
    return np.select([alternative == "greater", alternative == "less"], [upper, lower], default=two)


def relative_difference(mean_t: Array, var_t: Array, mean_c: Array, var_c: Array) -> tuple[Array, Array]:
    """mean_t / mean_c - 1 and its delta-method standard error (independent groups)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(mean_c != 0, mean_t / mean_c - 1.0, np.nan)
        se = np.sqrt(var_t / mean_c**2 + mean_t**2 * var_c / mean_c**4)
    return rel, np.where(mean_c != 0, se, np.nan)


def fieller_interval(mean_t: Array, var_t: Array, mean_c: Array, var_c: Array,
                     critical: Array) -> tuple[Array, Array]:
    """Fieller's interval for mean_t / mean_c - 1 at the critical value of the absolute test.

    It is the set of relative effects r - 1 that the test of H0: mean_t - r mean_c = 0 (variance
    var_t + r^2 var_c) does not reject, so it excludes 0 exactly when the test of the difference
    rejects, and it excludes a relative margin exactly when the ratio form of the non-inferiority
    test rejects: the relative interval can never disagree with the verdict beside it (the
    delta-method interval can: it is wider on the side away from the control). NaN where the
    control mean is not itself distinguishable from 0 (the set is then unbounded).
    """
    c2 = critical**2
    a = mean_c**2 - c2 * var_c
    b = mean_t * mean_c
    disc = b**2 - a * (mean_t**2 - c2 * var_t)
    with np.errstate(divide="ignore", invalid="ignore"):
        root = np.sqrt(np.maximum(disc, 0.0))
        bounded = (a > 0) & np.isfinite(critical)
        lower = np.where(bounded, (b - root) / a - 1.0, np.nan)
        upper = np.where(bounded, (b + root) / a - 1.0, np.nan)
    return lower, upper


def holm_reject(p: Array, alpha: float) -> NDArray[np.bool_]:
    """Holm's step-down procedure over all of `p` (NaN never rejects)."""
    valid = np.isfinite(p)
    reject = np.zeros(p.shape, dtype=bool)
    order = np.argsort(np.where(valid, p, np.inf), kind="stable")
    m = int(valid.sum())
    for rank, idx in enumerate(order[:m]):
        if p[idx] <= alpha / (m - rank):
            reject[idx] = True
        else:
            break
    return reject


def holm_adjusted(p: Array) -> Array:
    """Holm-adjusted p-values (the smallest family alpha at which each would be rejected)."""
    valid = np.isfinite(p)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(valid)
    if idx.size == 0:
        return out
    order = idx[np.argsort(p[idx], kind="stable")]
    m = order.size
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out[order] = adjusted
    return out


def srm_test(observed: Array, expected_share: Array) -> tuple[float, Array]:
    """Pearson chi-square goodness of fit of unit counts to the expected split: (p-value, expected)."""
    total = float(observed.sum())
    expected = total * expected_share
    if total <= 0:
        return float("nan"), expected
    chi2 = float(np.sum((observed - expected) ** 2 / expected))
    return float(stats.chi2.sf(chi2, observed.size - 1)), expected


def z_level(alpha: Array | float, sides: Array | int) -> Array:
    """Normal critical value for a test at `alpha` with 1 or 2 sides."""
    return stats.norm.isf(np.asarray(alpha) / np.asarray(sides))


def required_units(var_c: Array, var_t: Array, share_c: Array, share_t: Array, effect: Array,
                   alpha: Array, beta: Array, sides: Array) -> Array:
    """Total units for the experiment so that an absolute `effect` is detected with power 1 - beta.

    Var(diff) = var_c / (N share_c) + var_t / (N share_t) must equal (effect / (z_alpha + z_beta))^2,
    the normal-approximation sample size (the formula of a z test; one-sided in the preferred
    direction or two-sided ignoring the far tail).
    """
    z = z_level(alpha, sides) + stats.norm.isf(beta)
    with np.errstate(divide="ignore", invalid="ignore"):
        return z**2 * (var_c / share_c + var_t / share_t) / effect**2


def detectable_effect(var_mean_c: Array, var_mean_t: Array, alpha: Array, beta: Array, sides: Array) -> Array:
    """Absolute minimum detectable effect at the current sample size (same approximation)."""
    return (z_level(alpha, sides) + stats.norm.isf(beta)) * np.sqrt(var_mean_c + var_mean_t)
