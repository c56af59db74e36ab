"""Per-variant estimates and their variances from sufficient statistics, vectorised with numpy.

Every function takes arrays (one entry per metric-variant cell) so that a whole experiment is
computed in a handful of array operations, whatever the number of metrics and variants.

Variance conventions (the same as Spotify's confidence library, so results are comparable):

* `binary`: the unit variance is p(1 - p) with p = sum / n (the maximum-likelihood variance;
  for 0/1 data sum_sq == sum, so it equals sum_sq / n - p^2).
* `mean`: the unit variance is the unbiased sample variance (sum_sq - sum^2 / n) / (n - 1).
* `ratio` (sum of Y over sum of X per variant, e.g. clicks per session): the delta method,
  Var(R) = (Var(Y) - 2 R Cov(Y, X) + R^2 Var(X)) / (n * mean(X)^2), moments with n - 1.
* CUPED: Y is adjusted by theta * (X - mean(X)) where X is the same metric before exposure and
  theta is the pooled within-variant regression slope sum(S_xy) / sum(S_xx). With that theta the
  difference of adjusted means is exactly the OLS treatment coefficient of Y ~ variant + X (the
  ANCOVA estimator); its variance per variant is Var(Y - theta X) / n with n - 1 moments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]


@dataclass(frozen=True)
class Estimates:
    """Point estimate and variance of the estimate (not of a unit) per cell."""

    mean: Array
    var_mean: Array
    # Unit-level variance behind var_mean; Welch degrees of freedom need it with n.
    var_unit: Array


def _safe_div(num: Array, den: Array) -> Array:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den != 0, num / np.where(den != 0, den, 1.0), np.nan)


def centered(n: Array, sum_a: Array, sum_b: Array, prod_sum: Array) -> Array:
    """Sum of (a - mean a)(b - mean b) from raw sums: prod_sum - sum_a * sum_b / n."""
    return prod_sum - _safe_div(sum_a * sum_b, n)


def mean_estimates(n: Array, total: Array, sum_sq: Array, binary: NDArray[np.bool_]) -> Estimates:
    """Means of per-unit values; binary cells use p(1 - p), others the n - 1 sample variance."""
    mean = _safe_div(total, n)
    var_sample = _safe_div(centered(n, total, total, sum_sq), n - 1)
    var_binary = mean * (1.0 - mean)
    var_unit = np.where(binary, var_binary, var_sample)
    var_unit = np.maximum(var_unit, 0.0)  # rounding can make an exact zero slightly negative
    return Estimates(mean=mean, var_mean=_safe_div(var_unit, n), var_unit=var_unit)


def ratio_estimates(n: Array, num_sum: Array, num_sum_sq: Array, den_sum: Array, den_sum_sq: Array,
                    prod_sum: Array) -> Estimates:
    """Ratio of sums per variant with its delta-method variance (unit moments with n - 1)."""
    ratio = _safe_div(num_sum, den_sum)
    var_y = _safe_div(centered(n, num_sum, num_sum, num_sum_sq), n - 1)
    var_x = _safe_div(centered(n, den_sum, den_sum, den_sum_sq), n - 1)
    cov_xy = _safe_div(centered(n, num_sum, den_sum, prod_sum), n - 1)
    mean_x = _safe_div(den_sum, n)
    # Unit-level "linearised" variance: Var(Y - R X) / mean(X)^2.
    var_unit = np.maximum(_safe_div(var_y - 2 * ratio * cov_xy + ratio**2 * var_x, mean_x**2), 0.0)
    return Estimates(mean=ratio, var_mean=_safe_div(var_unit, n), var_unit=var_unit)


def cuped_theta(n: Array, y_sum: Array, x_sum: Array, x_sum_sq: Array, xy_sum: Array,
                group: NDArray[np.int64], n_groups: int) -> Array:
    """Pooled within-variant slope of Y on the covariate X, one per group (metric), per cell.

    `group[i]` says which metric cell i belongs to; the slope is pooled over the variants of
    that metric. A covariate without variance (e.g. nobody active before exposure) gives 0,
    which turns CUPED off for that metric instead of dividing by zero.
    """
    sxx = np.bincount(group, weights=centered(n, x_sum, x_sum, x_sum_sq), minlength=n_groups)
    sxy = np.bincount(group, weights=centered(n, y_sum, x_sum, xy_sum), minlength=n_groups)
    theta = np.where(sxx > 0, sxy / np.where(sxx > 0, sxx, 1.0), 0.0)
    return theta[group]


def cuped_estimates(n: Array, y_sum: Array, y_sum_sq: Array, x_sum: Array, x_sum_sq: Array, xy_sum: Array,
                    theta: Array, x_grand_mean: Array) -> Estimates:
    """Means of Y - theta (X - grand mean of X) per cell, with n - 1 moments of the adjusted value."""
    mean_y = _safe_div(y_sum, n)
    mean_x = _safe_div(x_sum, n)
    mean = mean_y - theta * (mean_x - x_grand_mean)
    syy = centered(n, y_sum, y_sum, y_sum_sq)
    sxx = centered(n, x_sum, x_sum, x_sum_sq)
    sxy = centered(n, y_sum, x_sum, xy_sum)
    var_unit = np.maximum(_safe_div(syy - 2 * theta * sxy + theta**2 * sxx, n - 1), 0.0)
    return Estimates(mean=mean, var_mean=_safe_div(var_unit, n), var_unit=var_unit)


def variance_reduction(n: Array, y_sum: Array, y_sum_sq: Array, adjusted_var_unit: Array) -> Array:
    """1 - Var(adjusted) / Var(unadjusted) per cell: how much CUPED tightened the interval."""
    var_y = _safe_div(centered(n, y_sum, y_sum, y_sum_sq), n - 1)
    return 1.0 - _safe_div(adjusted_var_unit, var_y)
