"""Sequential testing: group-sequential bounds with Lan-DeMets alpha spending, and confidence sequences.

Group-sequential (Lan & DeMets 1983, power family of Kim & DeMets 1987): by information fraction
t (units so far / expected units, capped at 1) the test may have spent alpha * t^rho of its type I
error. The bound of each look is chosen so that the probability, under the null, of crossing it
for the first time at that look equals the alpha newly spent there. The crossing probabilities
come from the exact recursion on the score process S_k = Z_k sqrt(t_k), whose increments are
independent N(0, t_k - t_{k-1}): the density of S on the continuation region is carried from look
to look on a grid (Simpson weights) and convolved with the increment's normal kernel, all in numpy.

Any recompute schedule (`monitoring_bound`): the analysis worker recomputes every few minutes, so
the looks of a group-sequential test are not a handful of planned days but every recompute, for
weeks. Bounds computed for "the days so far + now" would be crossed more often than alpha allows.
Instead the bound is the Lan-DeMets boundary for *continuous* monitoring: the same recursion on a
fine grid of information fractions (1/1000 apart), raised by Siegmund's continuity correction
(0.5826 sqrt(step) on the score scale) so that crossing it at any time at all, not only at the grid
points, has probability at most alpha. A test that looks at any subset of times, however many and
whenever, crosses it with no more probability than that; the bound depends on the information
fraction alone, never on the earlier looks.

Always-valid (Robbins' normal mixture, as in Johari et al. 2017 "Peeking at A/B tests" and
Howard et al. 2021): for an estimate with variance V and mixing variance tau^2, the interval
estimate +- sqrt(V (V + tau^2) / tau^2 * (log((V + tau^2) / V) - 2 log alpha)) covers the true
effect at every look simultaneously with probability 1 - alpha. tau^2 is tuned so the sequence is
tightest at the expected sample size: tau^2 = V* (-2 log alpha + log(1 - 2 log alpha)), V* the
variance expected at that size.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from scipy import optimize, special
from scipy.stats import norm

# Bounds are truncated here on the z scale (no practical test needs more, and the grid stays finite).
Z_TRUNCATE = 8.0
_MIN_STEP_INCREMENT = 1e-9


def spent_alpha(t: np.ndarray, alpha: float, rho: float) -> np.ndarray:
    """Cumulative alpha spent by information fraction t: alpha * t^rho (t capped at 1)."""
    return alpha * np.power(np.clip(t, 0.0, 1.0), rho)


def _simpson_weights(m: int, h: float) -> np.ndarray:
    w = np.ones(m)
    w[1:-1:2] = 4.0
    w[2:-1:2] = 2.0
    return w * h / 3.0


def _grid(lo: float, hi: float, step: float) -> tuple[np.ndarray, np.ndarray]:
    """An odd-sized grid over [lo, hi] with Simpson weights."""
    intervals = max(2, int(np.ceil((hi - lo) / step)))
    intervals += intervals % 2
    intervals = min(intervals, 6000)
    x = np.linspace(lo, hi, intervals + 1)
    return x, _simpson_weights(intervals + 1, (hi - lo) / intervals)


def group_sequential_bounds(t: Sequence[float], alpha: float, rho: float = 2.0, sides: int = 2) -> np.ndarray:
    """The z-statistic bound of each look, for information fractions `t` (increasing, > 0).

    `sides=2` gives symmetric two-sided bounds spending `alpha` in total (alpha / 2 per side);
    `sides=1` gives upper bounds spending `alpha` on one side (the lower side runs to -8).
    Looks whose information did not grow (t capped at 1 after the expected size was reached)
    repeat the previous bound: no alpha is left to spend on them.
    """
    if sides not in (1, 2):
        raise ValueError("sides must be 1 or 2")
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must be within (0, 1)")
    times = np.minimum(np.asarray(t, dtype=float), 1.0)
    if times.size == 0:
        return np.empty(0)
    if np.any(times <= 0) or np.any(np.diff(times) < -1e-12):
        raise ValueError("information fractions must be positive and non-decreasing")
    spent = spent_alpha(times, alpha, rho)
    bounds = np.empty(times.size)

    def tail(b: np.ndarray | float) -> np.ndarray | float:
        """P(crossing) of a standard normal beyond b on the tested side(s)."""
        return sides * norm.sf(b)

    # First look: plain normal quantile.
    bounds[0] = min(float(norm.isf(spent[0] / sides)), Z_TRUNCATE)
    last_t = times[0]
    sd0 = np.sqrt(last_t)
    hi = bounds[0] * sd0
    lo = -hi if sides == 2 else -Z_TRUNCATE * sd0
    x, w = _grid(lo, hi, step=sd0 / 100)
    density = norm.pdf(x, scale=sd0)
    last_spent = spent[0]
    for k in range(1, times.size):
        increment = times[k] - last_t
        if increment <= _MIN_STEP_INCREMENT or spent[k] - last_spent <= 0:
            bounds[k] = bounds[k - 1]
            continue
        target = spent[k] - last_spent
        sd = np.sqrt(increment)
        sqrt_t = np.sqrt(times[k])
        mass = w * density

        def excess(z: float, x: np.ndarray = x, mass: np.ndarray = mass, sd: float = sd, sqrt_t: float = sqrt_t,
                   target: float = target) -> float:
            b = z * sqrt_t
            cross = special.ndtr((x - b) / sd)
            if sides == 2:
                cross = cross + special.ndtr((-b - x) / sd)
            return float(np.dot(mass, cross)) - target

        if excess(Z_TRUNCATE) >= 0:
            bounds[k] = Z_TRUNCATE
        else:
            bounds[k] = optimize.brentq(excess, 0.0, Z_TRUNCATE, xtol=1e-12, rtol=1e-12, maxiter=200)
        # Carry the sub-density of "not stopped yet" to the new continuation region.
        hi = bounds[k] * sqrt_t
        lo = -hi if sides == 2 else -Z_TRUNCATE * sqrt_t
        new_x, new_w = _grid(lo, hi, step=min(sd / 8, sqrt_t / 100))
        kernel = np.exp(-0.5 * np.square((new_x[:, None] - x[None, :]) / sd)) / (sd * np.sqrt(2 * np.pi))
        density = kernel @ mass
        x, w = new_x, new_w
        last_t, last_spent = times[k], spent[k]
    return bounds


MONITORING_STEPS = 1000
_SIEGMUND = 0.5826


@lru_cache(maxsize=64)
def monitoring_bounds(alpha: float, rho: float = 2.0, sides: int = 2,
                      steps: int = MONITORING_STEPS) -> tuple[np.ndarray, np.ndarray]:
    """(t, z bound) on the grid t = 1/steps .. 1 of the continuous-monitoring Lan-DeMets boundary.

    The recursion is the one of `group_sequential_bounds`, on a fixed grid of the score S with
    spacing sd/8 (sd = sqrt(step)) and a banded Gaussian kernel, which makes 1000 looks cost well
    under a second. The grid point's cell that the bound cuts is weighted by the fraction inside
    the continuation region. The continuity correction turns the grid boundary into one for
    monitoring at every instant (Siegmund 1985).
    """
    if sides not in (1, 2):
        raise ValueError("sides must be 1 or 2")
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must be within (0, 1)")
    dt = 1.0 / steps
    sd = float(np.sqrt(dt))
    h = sd / 8.0
    half = int(np.ceil(Z_TRUNCATE / h))
    x = np.arange(-half, half + 1) * h
    reach = int(np.ceil(8.0 * sd / h))
    kernel = norm.pdf(np.arange(-reach, reach + 1) * h, scale=sd) * h
    t = np.arange(1, steps + 1) * dt
    spent = spent_alpha(t, alpha, rho)
    edge = np.empty(steps)

    def inside(e: float) -> np.ndarray:
        w = np.clip((e - (x - h / 2)) / h, 0.0, 1.0)
        return w * np.clip((x + h / 2 + e) / h, 0.0, 1.0) if sides == 2 else w

    edge[0] = min(float(norm.isf(spent[0] / sides)), Z_TRUNCATE) * np.sqrt(t[0])
    mass = norm.pdf(x, scale=sd) * h * inside(edge[0])
    for k in range(1, steps):
        target = spent[k] - spent[k - 1]
        live = mass > 1e-300
        xs, ms = x[live], mass[live]

        def excess(e: float, xs: np.ndarray = xs, ms: np.ndarray = ms, target: float = target) -> float:
            cross = special.ndtr((xs - e) / sd)
            if sides == 2:
                cross = cross + special.ndtr((-e - xs) / sd)
            return float(ms @ cross) - target

        top = Z_TRUNCATE * float(np.sqrt(t[k]))
        edge[k] = top if excess(top) >= 0 else optimize.brentq(excess, 0.0, top, xtol=1e-10)
        mass = np.convolve(mass, kernel, "same") * inside(edge[k])
    bounds = np.minimum((edge + _SIEGMUND * sd) / np.sqrt(t), Z_TRUNCATE)
    bounds.setflags(write=False)
    t.setflags(write=False)
    return t, bounds


def monitoring_bound(t: float, alpha: float, rho: float = 2.0, sides: int = 2) -> float:
    """The z bound at information fraction `t`, valid whatever the looks before and after it.

    Between grid points the larger neighbouring bound applies (the boundary is smooth, so this
    is never below the continuous one); before the first grid point the truncation bound (no
    alpha is spent there); from t = 1 on the bound of t = 1 (the worker closes a group-sequential
    test at its plan, see `analysis_worker.looks`).
    """
    grid, bounds = monitoring_bounds(float(alpha), float(rho), int(sides))
    steps = grid.size
    if not t > 0:
        return Z_TRUNCATE
    j = int(np.floor(min(t, 1.0) * steps + 1e-9))
    if j < 1:
        return Z_TRUNCATE
    return float(max(bounds[j - 1], bounds[min(j, steps - 1)]))


def mixture_tau2(expected_var: float, alpha: float) -> float:
    """Mixing variance that makes the normal-mixture sequence tightest at variance `expected_var`."""
    log_term = -2.0 * np.log(alpha)
    return float(expected_var * (log_term + np.log1p(log_term)))


def confidence_sequence_halfwidth(var: np.ndarray, tau2: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Half-width of the always-valid (1 - alpha) interval for estimates of variance `var`."""
    return np.sqrt(var * (var + tau2) / tau2 * (np.log((var + tau2) / var) - 2.0 * np.log(alpha)))


def always_valid_p_value(estimate: np.ndarray, var: np.ndarray, tau2: np.ndarray) -> np.ndarray:
    """1 / likelihood ratio of the normal mixture against the null (capped at 1)."""
    log_lr = 0.5 * np.log(var / (var + tau2)) + tau2 * estimate**2 / (2.0 * var * (var + tau2))
    return np.minimum(1.0, np.exp(-log_lr))
