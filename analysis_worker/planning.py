"""Planning before an experiment: units needed for an effect, and the effect a given size can detect.

Thin, scalar-friendly wrappers over the vectorised formulas in `hypotheses` (the same ones the
results document uses for `required_units` and `powered_effect`), so a planning question and the
analysis can never disagree. Effects are relative to the control mean, the way people state them
("detect a 2 % lift").
"""

from __future__ import annotations

import math

import numpy as np

from analysis_worker import hypotheses


def _check(alpha: float, power: float, share: float) -> None:
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError("alpha and power must be within (0, 1)")
    if not 0 < share < 1:
        raise ValueError("treatment_share must be within (0, 1)")


def sample_size(baseline_mean: float, unit_variance: float, relative_mde: float, *, alpha: float = 0.05,
                power: float = 0.8, treatment_share: float = 0.5, sides: int = 2) -> int:
    """Total units (control + treatment) to detect `relative_mde` with the given power.

    `unit_variance` is the per-unit variance (p (1 - p) for a conversion rate); both arms are
    assumed to share it. `sides=1` for a one-sided test in the preferred direction.
    """
    _check(alpha, power, treatment_share)
    effect = abs(relative_mde * baseline_mean)
    if effect == 0:
        raise ValueError("relative_mde and baseline_mean must be non-zero")
    n = hypotheses.required_units(np.array([unit_variance]), np.array([unit_variance]),
                                  np.array([1 - treatment_share]), np.array([treatment_share]),
                                  np.array([effect]), np.array([alpha]), np.array([1 - power]), np.array([sides]))
    return math.ceil(float(n[0]))


def minimum_detectable_effect(total_units: float, baseline_mean: float, unit_variance: float, *,
                              alpha: float = 0.05, power: float = 0.8, treatment_share: float = 0.5,
                              sides: int = 2) -> float:
    """The relative effect detectable with `total_units` (control + treatment) at the given power."""
    _check(alpha, power, treatment_share)
    if total_units <= 0 or baseline_mean == 0:
        raise ValueError("total_units must be positive and baseline_mean non-zero")
    var_c = unit_variance / (total_units * (1 - treatment_share))
    var_t = unit_variance / (total_units * treatment_share)
    effect = hypotheses.detectable_effect(np.array([var_c]), np.array([var_t]), np.array([alpha]),
                                          np.array([1 - power]), np.array([sides]))
    return float(effect[0]) / abs(baseline_mean)
