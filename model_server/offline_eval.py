"""Off-policy evaluation: what would a candidate policy have earned on the logged decisions?

Given logged (context x_i, arm a_i, propensity p_i, reward r_i) from the policy that was
serving, and the candidate's probability pi(a_i | x_i) of the same arm, with weights
w_i = pi(a_i | x_i) / p_i:

    IPS   = mean(w_i r_i)                          unbiased when every p_i > 0
    SNIPS = sum(w_i r_i) / sum(w_i)                slightly biased, much lower variance

Confidence intervals are normal approximations: IPS from the sample variance of w_i r_i;
SNIPS by the delta method for a ratio of means, var = mean(w_i^2 (r_i - SNIPS)^2) / (n mean(w)^2).
The effective sample size (sum w)^2 / sum w^2 says how much of the log the candidate can use.
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
    return OffPolicyReport(n, confidence, logged, ips, _estimate(snips_value, snips_se, z), ess, float(w.max()))


GATES = ("none", "not-worse", "better")


def gate(report: OffPolicyReport, rule: str) -> tuple[bool, str]:
    """Whether to publish the candidate, and why, under `rule`.

    not-worse: refuse only when SNIPS is confidently below the logging policy's observed value;
    better: publish only when SNIPS is confidently above it; none: always publish.
    """
    logged, snips = report.logged.value, report.snips
    if rule == "none":
        return True, "publishing without an evaluation gate"
    if rule == "not-worse":
        if snips.ci_upper < logged:
            return False, (f"candidate is worse: SNIPS {snips.value:.4g} (CI upper {snips.ci_upper:.4g}) < "
                           f"logged value {logged:.4g}")
        return True, f"candidate is not worse: SNIPS CI upper {snips.ci_upper:.4g} >= logged value {logged:.4g}"
    if rule == "better":
        if snips.ci_lower > logged:
            return True, f"candidate is better: SNIPS CI lower {snips.ci_lower:.4g} > logged value {logged:.4g}"
        return False, (f"candidate is not confidently better: SNIPS CI lower {snips.ci_lower:.4g} <= "
                       f"logged value {logged:.4g}")
    raise ValueError(f"gate must be one of {', '.join(GATES)}; got {rule!r}")
