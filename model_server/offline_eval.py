"""Off-policy evaluation: what would a candidate policy have earned on the logged decisions?

Given logged (context x_i, arm a_i, propensity p_i, reward r_i) from the policy that was
serving, and the candidate's probability pi(a_i | x_i) of the same arm, with weights
w_i = pi(a_i | x_i) / p_i:

    IPS   = mean(w_i r_i)                          unbiased when every p_i > 0
    SNIPS = sum(w_i r_i) / sum(w_i)                slightly biased, much lower variance

Confidence intervals are normal approximations: IPS from the sample variance of w_i r_i;
SNIPS by the delta method for a ratio of means, var = mean(w_i^2 (r_i - SNIPS)^2) / (n mean(w)^2).
The effective sample size (sum w)^2 / sum w^2 says how much of the log the candidate can use.

The publishing gates compare the candidate with the logging policy on the *same* rows: the
difference D = SNIPS - mean(r) is paired (both use every row's reward), so its variance is that
of the per-row influence psi_i = w_i (r_i - SNIPS) / mean(w) - (r_i - mean(r)), far smaller than
the two intervals' widths added up. A gate publishes on a one-sided lower confidence bound of D
(a non-inferiority test for `not-worse`, superiority for `better`) and refuses outright when the
effective sample size is below a minimum, where neither the estimate nor its normal interval can
be trusted (a few large weights dominate).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Estimate:
    value: float
    stderr: float
    ci_lower: float
    ci_upper: float


@dataclass(frozen=True)
class OffPolicyReport:
    """A candidate's estimated value beside the logging policy's observed value."""

    n: int
    confidence: float
    logged: Estimate
    ips: Estimate
    snips: Estimate
    effective_sample_size: float
    max_weight: float
    difference: Estimate  # SNIPS - logged value on the same rows, paired (two-sided interval)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _estimate(value: float, stderr: float, z: float) -> Estimate:
    return Estimate(float(value), float(stderr), float(value - z * stderr), float(value + z * stderr))


def evaluate(rewards: np.ndarray, logged_propensity: np.ndarray, target_probability: np.ndarray,
             confidence: float = 0.95) -> OffPolicyReport:
    """IPS and SNIPS of a target policy from logged rewards and propensities (see module docs)."""
    r = np.asarray(rewards, dtype=np.float64)
    p = np.asarray(logged_propensity, dtype=np.float64)
    q = np.asarray(target_probability, dtype=np.float64)
    n = len(r)
    if n < 2 or len(p) != n or len(q) != n:
        raise ValueError("need at least two logged decisions, with one propensity and target probability each")
    if not (p > 0).all() or not (p <= 1).all():
        raise ValueError("logged propensities must be within (0, 1]")
    if not ((q >= 0) & (q <= 1)).all():
        raise ValueError("target probabilities must be within [0, 1]")
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    w = q / p
    wr = w * r
    ips = _estimate(wr.mean(), wr.std(ddof=1) / np.sqrt(n), z)
    w_mean = w.mean()
    if w_mean > 0:
        snips_value = wr.sum() / w.sum()
        snips_se = np.sqrt(np.mean(w**2 * (r - snips_value) ** 2) / n) / w_mean
    else:
        snips_value, snips_se = 0.0, float("inf")
    logged = _estimate(r.mean(), r.std(ddof=1) / np.sqrt(n), z)
    ess = float(w.sum() ** 2 / (w**2).sum()) if (w**2).sum() > 0 else 0.0
    if w_mean > 0:
        influence = w * (r - snips_value) / w_mean - (r - r.mean())
        diff_se = float(np.sqrt((influence**2).sum() / (n - 1) / n))
    else:
        diff_se = float("inf")
    difference = _estimate(snips_value - r.mean(), diff_se, z)
    return OffPolicyReport(n, confidence, logged, ips, _estimate(snips_value, snips_se, z), ess, float(w.max()),
                           difference)


GATES = ("none", "not-worse", "better")
DEFAULT_MARGIN = 0.05  # not-worse: tolerated shortfall, as a share of the logged policy's value
DEFAULT_GATE_CONFIDENCE = 0.95
DEFAULT_MIN_ESS = 100.0


@dataclass(frozen=True)
class GateDecision:
    """What a gate decided and the numbers it decided on (stored in the manifest, printed by the CLI)."""

    rule: str
    publish: bool
    reason: str
    confidence: float = DEFAULT_GATE_CONFIDENCE
    margin: float = 0.0  # relative, as given
    threshold: float | None = None  # the lower bound must exceed this (in reward units)
    difference: float | None = None  # SNIPS - logged value
    lower_bound: float | None = None  # one-sided, at `confidence`
    effective_sample_size: float | None = None
    min_effective_sample_size: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate(report: OffPolicyReport, rule: str, *, margin: float = DEFAULT_MARGIN,
         confidence: float = DEFAULT_GATE_CONFIDENCE, min_ess: float = DEFAULT_MIN_ESS) -> GateDecision:
    """Whether to publish the candidate under `rule`, on the paired difference D = SNIPS - logged value.

    not-worse: publish when the one-sided `confidence` lower bound of D is above
    -margin * |logged value|: a candidate truly worse than that is published with probability at
    most 1 - confidence (asymptotically). better: publish when the lower bound is above 0. Both
    refuse when the effective sample size is below `min_ess`. none: always publish.
    """
    if rule not in GATES:
        raise ValueError(f"gate must be one of {', '.join(GATES)}; got {rule!r}")
    if not 0.5 <= confidence < 1 or margin < 0 or min_ess < 0:
        raise ValueError("gate confidence must be within [0.5, 1), margin and minimum ESS not negative")
    if rule == "none":
        return GateDecision(rule, True, "publishing without an evaluation gate", confidence, margin)
    logged = report.logged.value
    diff = report.difference
    lower = diff.value - float(stats.norm.ppf(confidence)) * diff.stderr
    threshold = -margin * abs(logged) if rule == "not-worse" else 0.0
    numbers = {"confidence": confidence, "margin": margin if rule == "not-worse" else 0.0, "threshold": threshold,
               "difference": diff.value, "lower_bound": lower, "effective_sample_size": report.effective_sample_size,
               "min_effective_sample_size": min_ess}
    said = (f"SNIPS {report.snips.value:.4g} vs logged {logged:.4g} on the same {report.n} rows: difference "
            f"{diff.value:+.4g}, {confidence:.0%} lower bound {lower:+.4g}")
    if report.effective_sample_size < min_ess:
        return GateDecision(rule, False, f"too little evidence to tell: effective sample size "
                                         f"{report.effective_sample_size:.0f} of {report.n} rows is below "
                                         f"{min_ess:g} ({said})", **numbers)
    if rule == "not-worse":
        if lower > threshold:
            return GateDecision(rule, True, f"candidate is not worse: {said} > {threshold:+.4g} "
                                            f"(at most {margin:.0%} below logged)", **numbers)
        return GateDecision(rule, False, f"candidate not shown to be not worse: {said} <= {threshold:+.4g} "
                                         f"(at most {margin:.0%} below logged)", **numbers)
    if lower > 0:
        return GateDecision(rule, True, f"candidate is better: {said} > 0", **numbers)
    return GateDecision(rule, False, f"candidate is not confidently better: {said} <= 0", **numbers)
