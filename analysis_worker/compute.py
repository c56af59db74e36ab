"""From a validated `StatsInput` to the results document of contract 5.

What is tested, at which alpha, and how the answer becomes a recommendation:

* Success metrics are tested two-sided for a difference (corrections `none`, `bonferroni`,
  `holm`), or one-sided for superiority in their preferred direction (`risk-aware`).
* Guardrails are one-sided non-inferiority tests of a relative margin: H0 says mean_t is at most
  (1 - nim) mean_c (`increase`; (1 + nim) for `decrease`), tested in ratio form with the control
  mean's own variance, so that the relative (Fieller) interval agrees with the verdict.
* Alpha per comparison: `none` alpha; `bonferroni` alpha / (all comparisons); `holm` Holm's
  step-down over all comparisons (intervals at the Bonferroni level); `risk-aware` follows
  Schultzberg, Ankargren & Frånberg, "Risk-aware product decisions in A/B tests with multiple
  metrics" (Spotify 2024, arXiv 2402.11609): alpha / (success metrics x treatments) for success
  metrics, alpha / treatments for guardrails (all must pass, so no correction among them), and
  inferiority (deterioration) tests of every success and guardrail metric with their own budget
  `deterioration_alpha` split over the treatment's metrics; beta is shared with the deterioration
  and sample-ratio tests and split over guardrails + 1 in sample-size planning.
* Every interval is built with the critical value of the test beside it (absolute: difference
  +- multiplier x SE; relative: Fieller's interval at the same multiplier), so an interval
  excludes the null exactly when its test rejects. One-sided tests show the 1 - 2 alpha interval.
* Sequential: `group-sequential` compares the statistic with the Lan-DeMets bound for continuous
  monitoring at the current information fraction (valid whatever the recompute schedule; the
  p-value stays the nominal one, the interval uses the bound); `always-valid` reports the
  normal-mixture confidence sequence and its always-valid p-value.
* Recommendation per treatment (`_decide`): ship only with a significant win, every guardrail
  non-inferior, nothing significantly deteriorated and the quality checks passed.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from analysis_worker import estimators, hypotheses, sequential
from analysis_worker.inputs import MetricInput, StatsInput, VariantStats

Array = NDArray[np.float64]


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null, numpy scalars plain Python."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.bool_ | bool):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        f = float(value)
        return f if math.isfinite(f) else None
    return value


@dataclass
class _Cells:
    """One entry per (metric, variant): raw sums and the estimates derived from them."""

    metric: NDArray[np.int64]
    variant: list[str]
    n: Array
    raw_mean: Array
    mean: Array
    var_mean: Array
    var_unit: Array
    theta: Array
    var_reduction: Array


def _build_cells(metrics: list[MetricInput], control: str, order: list[str]) -> _Cells:
    metric_idx: list[int] = []
    variants: list[str] = []
    rows: list[VariantStats] = []
    for mi, metric in enumerate(metrics):
        for name in [control, *[v for v in order if v != control]]:
            if name in metric.variants:
                metric_idx.append(mi)
                variants.append(name)
                rows.append(metric.variants[name])
    group = np.asarray(metric_idx, dtype=np.int64)

    def col(attr: str) -> Array:
        return np.asarray([getattr(r, attr) for r in rows], dtype=float)

    n, s, ss = col("n"), col("sum"), col("sum_sq")
    kind = np.asarray([metrics[i].kind for i in metric_idx])
    cuped = np.asarray([metrics[i].cuped for i in metric_idx], dtype=bool)
    plain = estimators.mean_estimates(n, s, ss, binary=kind == "binary")
    ratio = estimators.ratio_estimates(n, s, ss, col("den_sum"), col("den_sum_sq"), col("prod_sum"))
    is_ratio = kind == "ratio"
    mean = np.where(is_ratio, ratio.mean, plain.mean)
    var_mean = np.where(is_ratio, ratio.var_mean, plain.var_mean)
    var_unit = np.where(is_ratio, ratio.var_unit, plain.var_unit)
    theta = np.zeros(n.size)
    reduction = np.full(n.size, np.nan)
    if cuped.any():
        cs, css, cps = col("cov_sum"), col("cov_sum_sq"), col("cov_prod_sum")
        theta = estimators.cuped_theta(n, s, cs, css, cps, group, len(metrics))
        with np.errstate(divide="ignore", invalid="ignore"):
            grand = np.bincount(group, weights=cs, minlength=len(metrics)) / np.bincount(
                group, weights=n, minlength=len(metrics))
        adjusted = estimators.cuped_estimates(n, s, ss, cs, css, cps, theta, grand[group])
        mean = np.where(cuped, adjusted.mean, mean)
        var_mean = np.where(cuped, adjusted.var_mean, var_mean)
        var_unit = np.where(cuped, adjusted.var_unit, var_unit)
        reduction = np.where(cuped, estimators.variance_reduction(n, s, ss, adjusted.var_unit), np.nan)
    theta = np.where(cuped, theta, np.nan)
    raw_mean = np.where(is_ratio, ratio.mean, plain.mean)
    return _Cells(metric=group, variant=variants, n=n, raw_mean=raw_mean, mean=mean, var_mean=var_mean,
                  var_unit=var_unit, theta=theta, var_reduction=reduction)


def _method(metric: MetricInput) -> str:
    if metric.kind == "ratio":
        base = "delta-method-z"
    elif metric.kind == "binary":
        base = "z-test"
    else:
        base = "welch-t" if metric.test == "welch-t" else "z-test"
    return f"cuped-{base}" if metric.cuped else base


def _run_tests(inp: StatsInput, statistic: Array, df: Array, alternative: NDArray[np.str_], alpha: Array,
               var: Array, excess: Array, n_now: float, *, holm: bool = False) -> tuple[Array, Array, Array, Array]:
    """One family of tests (vectorised): (p-value, significant, interval multiplier, sequential bound).

    Fixed horizon: the nominal test at `alpha`. Group-sequential: the statistic (on the normal
    scale) against the continuous-monitoring Lan-DeMets bound of the current information fraction
    (valid whatever the recompute schedule); the multiplier is that bound, so the interval is the
    repeated confidence interval. Always-valid: the normal-mixture sequence; a one-sided test uses
    the two-sided sequence at 2 alpha. In every case the interval built with the multiplier
    excludes the null exactly when the test rejects.
    """
    count = statistic.size
    sides = np.where(alternative == "two-sided", 2, 1)
    seq = inp.sequential
    bound = np.full(count, np.nan)
    if seq is None:
        p = hypotheses.p_values(statistic, df, alternative)
        multiplier = hypotheses.quantile(alpha / sides, df)
        significant = hypotheses.holm_reject(p, inp.alpha) if holm else p < alpha
    elif seq.method == "group-sequential":
        p = hypotheses.p_values(statistic, df, alternative)
        t = n_now / seq.expected_n
        bound = np.asarray([sequential.monitoring_bound(t, float(a), seq.rho, int(s))
                            for a, s in zip(alpha, sides, strict=True)], dtype=float)
        multiplier = hypotheses.t_equivalent(bound, df)
        z = hypotheses.normal_equivalent(statistic, df)
        significant = np.where(alternative == "greater", z >= bound,
                               np.where(alternative == "less", z <= -bound, np.abs(z) >= bound))
        significant = significant & np.isfinite(statistic)
    else:  # always-valid
        alpha_cs = np.where(sides == 1, 2 * alpha, alpha)
        with np.errstate(divide="ignore", invalid="ignore"):
            expected_var = var * n_now / seq.expected_n
            tau2 = np.asarray([sequential.mixture_tau2(float(v), float(a))
                               for v, a in zip(expected_var, alpha_cs, strict=True)])
            half = sequential.confidence_sequence_halfwidth(var, tau2, alpha_cs)
            multiplier = np.where(var > 0, half / np.sqrt(var), np.nan)
            p_two = sequential.always_valid_p_value(excess, var, tau2)
        right_side = np.where(alternative == "greater", excess > 0, excess < 0)
        p = np.where(sides == 2, p_two, np.where(right_side, p_two / 2, 1 - p_two / 2))
        significant = p < alpha
    return p, significant & np.isfinite(p), multiplier, bound


def _evidence(seq_method: str | None, statistic: float, df: float, p: float, alpha: float, bound: float,
              significant: bool) -> str:
    """The number that decided a test, as a reason states it."""
    if seq_method == "group-sequential":
        z = float(hypotheses.normal_equivalent(np.asarray([statistic]), np.asarray([df]))[0])
        return f"z = {z:.3g} {'crosses' if significant else 'within'} the bound {bound:.3g}"
    label = "always-valid p" if seq_method == "always-valid" else "p"
    return f"{label} = {p:.3g} {'<' if significant else '>='} alpha {alpha:.3g}"


def _evaluate(inp: StatsInput, metrics: list[MetricInput], n_now: float) -> tuple[_Cells, list[dict[str, Any]]]:
    """Estimates and every comparison (metric x treatment) for one snapshot of the statistics."""
    order = list(inp.expected_split)
    cells = _build_cells(metrics, inp.control, order)
    treatments = [v for v in order if v != inp.control]
    successes = sum(m.role == "success" for m in metrics)
    guardrails = len(metrics) - successes
    risk_aware = inp.correction == "risk-aware"

    control_cell = {int(cells.metric[i]): i for i in range(cells.n.size) if cells.variant[i] == inp.control}
    ci_idx: list[int] = []
    ti_idx: list[int] = []
    for i in range(cells.n.size):
        if cells.variant[i] != inp.control:
            ci_idx.append(control_cell[int(cells.metric[i])])
            ti_idx.append(i)
    c = np.asarray(ci_idx, dtype=np.int64)
    t = np.asarray(ti_idx, dtype=np.int64)
    count = t.size
    mets = [metrics[int(cells.metric[i])] for i in t]
    role = np.asarray([m.role for m in mets])
    direction = np.asarray([m.direction for m in mets])
    good = np.where(direction == "increase", 1.0, -1.0)
    nim = np.asarray([m.nim for m in mets], dtype=float)
    welch = np.asarray([m.test == "welch-t" and m.kind == "mean" for m in mets], dtype=bool)

    mean_t, mean_c = cells.mean[t], cells.mean[c]
    var_t, var_c = cells.var_mean[t], cells.var_mean[c]
    # The tested ratio mean_t / mean_c: 1 for "no difference"; for a guardrail the margin, so that
    # H0: diff <= -nim |mean_c| (increase) reads mean_t <= r0 mean_c, tested in ratio form.
    r0 = np.where(role == "guardrail", 1.0 - good * nim * np.sign(mean_c), 1.0)
    null = (r0 - 1.0) * mean_c
    one_sided = (role == "guardrail") | risk_aware
    alternative = np.where(one_sided, np.where(good > 0, "greater", "less"), "two-sided")
    sides = np.where(one_sided, 1, 2)

    if inp.correction == "none":
        alpha = np.full(count, inp.alpha)
    elif inp.correction in ("bonferroni", "holm"):
        alpha = np.full(count, inp.alpha / max(count, 1))
    else:  # risk-aware: success over success metrics x treatments, guardrails over treatments only
        alpha = np.where(role == "success", inp.alpha / max(successes * len(treatments), 1),
                         inp.alpha / max(len(treatments), 1))
    beta = 1.0 - inp.power
    if risk_aware:
        beta = (beta - inp.deterioration_level - hypotheses.SRM_THRESHOLD) / (guardrails + 1)

    diff = mean_t - mean_c
    var = var_t + var_c
    se = np.sqrt(var)
    var0 = var_t + r0**2 * var_c
    se0 = np.sqrt(var0)
    df_diff = np.where(welch, hypotheses.welch_df(var_t, cells.n[t], var_c, cells.n[c]), np.inf)
    df = np.where(welch, hypotheses.welch_df(var_t, cells.n[t], r0**2 * var_c, cells.n[c]), np.inf)
    excess = mean_t - r0 * mean_c
    with np.errstate(divide="ignore", invalid="ignore"):
        statistic = np.where(se0 > 0, excess / se0, np.nan)
    p, significant, multiplier, bound = _run_tests(inp, statistic, df, alternative, alpha, var0, excess, n_now,
                                                   holm=inp.correction == "holm")
    rel, _ = hypotheses.relative_difference(mean_t, var_t, mean_c, var_c)
    lower, upper = diff - multiplier * se, diff + multiplier * se
    rel_lower, rel_upper = hypotheses.fieller_interval(mean_t, var_t, mean_c, var_c, multiplier)
    improves = good * diff > 0

    # risk-aware: the paper's deterioration tests, one-sided inferiority at 0 for every success and
    # guardrail metric, with their own budget split over the treatment's metrics.
    if risk_aware:
        det_alt = np.where(good > 0, "less", "greater")
        det_alpha = np.full(count, inp.deterioration_level / max(len(metrics), 1))
        with np.errstate(divide="ignore", invalid="ignore"):
            det_stat = np.where(se > 0, diff / se, np.nan)
        det_p, deteriorated, det_mult, det_bound = _run_tests(inp, det_stat, df_diff, det_alt, det_alpha, var,
                                                              diff, n_now)
        det_abs = np.where(good > 0, diff + det_mult * se, diff - det_mult * se)  # the bad side's bound
        det_lo, det_hi = hypotheses.fieller_interval(mean_t, var_t, mean_c, var_c, det_mult)
        det_rel = np.where(good > 0, det_hi, det_lo)
        worse = deteriorated
    else:
        inferior = np.where(good > 0, upper < null, lower > null) & np.isfinite(se) & (se > 0)
        worse = np.where(role == "success", significant & ~improves & (alternative == "two-sided"), inferior)

    powered = hypotheses.detectable_effect(var_c, var_t, alpha, beta, sides)
    shares = inp.expected_split
    share_c = np.full(count, shares[inp.control])
    share_t = np.asarray([shares[cells.variant[i]] for i in t], dtype=float)
    mde = np.asarray([np.nan if m.mde is None else m.mde for m in mets], dtype=float)
    required = hypotheses.required_units(cells.var_unit[c], cells.var_unit[t], share_c, share_t,
                                         mde * np.abs(mean_c), alpha, beta, sides)
    seq_method = None if inp.sequential is None else inp.sequential.method
    seq_label = "" if seq_method is None else f", {seq_method}"

    comparisons: list[dict[str, Any]] = []
    for k in range(count):
        metric = mets[k]
        method = _method(metric) + seq_label
        if metric.role == "guardrail":
            test = f"non-inferiority test at margin {metric.nim:.3g} ({method})"
        elif alternative[k] == "two-sided":
            test = f"two-sided test ({method})"
        else:
            test = f"superiority test ({method})"
        row: dict[str, Any] = {
            "metric_index": int(cells.metric[t[k]]),
            "variant": cells.variant[t[k]],
            "baseline": inp.control,
            "diff": diff[k], "ci_lower": lower[k], "ci_upper": upper[k], "p_value": p[k],
            "relative_diff": rel[k], "relative_ci_lower": rel_lower[k], "relative_ci_upper": rel_upper[k],
            "method": method,
            "significant": bool(significant[k]),
            "alternative": str(alternative[k]),
            "null_diff": null[k], "null_relative_diff": r0[k] - 1.0,
            "std_err": se[k], "test_std_err": se0[k], "statistic": statistic[k], "df": df[k], "alpha": alpha[k],
            "critical_value": multiplier[k], "sequential_bound": bound[k],
            "test": test,
            "evidence": _evidence(seq_method, statistic[k], df[k], p[k], alpha[k], bound[k], bool(significant[k])),
            "improves": bool(improves[k]),
            "better": bool(significant[k] and improves[k] and metric.role == "success"),
            "worse": bool(worse[k]),
            "powered_effect": powered[k], "required_units": required[k],
        }
        if risk_aware:
            row["deterioration"] = {
                "test": f"inferiority test ({_method(metric) + seq_label})",
                "alternative": str(det_alt[k]), "alpha": det_alpha[k], "p_value": det_p[k],
                "statistic": det_stat[k], "critical_value": det_mult[k], "sequential_bound": det_bound[k],
                "bound": det_abs[k], "relative_bound": det_rel[k], "significant": bool(deteriorated[k]),
                "evidence": _evidence(seq_method, det_stat[k], df_diff[k], det_p[k], det_alpha[k], det_bound[k],
                                      bool(deteriorated[k])),
            }
        comparisons.append(row)
    return cells, comparisons


def _srm(inp: StatsInput) -> tuple[dict[str, float], dict[str, Any]]:
    order = list(inp.expected_split)
    if inp.units is not None:
        units = {v: float(inp.units.get(v, 0.0)) for v in order}
    else:
        units = {v: max((m.variants[v].n for m in inp.metrics if v in m.variants), default=0.0) for v in order}
    observed = np.asarray([units[v] for v in order])
    share = np.asarray([inp.expected_split[v] for v in order])
    p, expected = hypotheses.srm_test(observed, share)
    return units, {
        "p_value": p,
        "observed": {v: int(units[v]) for v in order},
        "expected": {v: float(e) for v, e in zip(order, expected, strict=True)},
        "expected_split": dict(inp.expected_split),
        "mismatch": bool(np.isfinite(p) and p < hypotheses.SRM_THRESHOLD),
        "threshold": hypotheses.SRM_THRESHOLD,
    }


def _required_sample(rows: list[dict[str, Any]], names: dict[int, str]) -> tuple[float, str]:
    """The largest total the power analysis asks for among the metrics with an `mde` (0 if none)."""
    best, name = 0.0, ""
    for c in rows:
        need = c.get("required_units")
        if need is not None and np.isfinite(need) and need > best:
            best, name = float(need), names[id(c)]
    return best, name


def _decide(inp: StatsInput, comparisons: list[dict[str, Any]], srm: dict[str, Any], running: bool,
            warnings: list[str], n_now: float) -> dict[str, Any]:
    """The recommendation per treatment and overall; every reason names the metric, the test and the number.

    Ship only if (1) a success metric is significantly superior, (2) every guardrail is
    significantly non-inferior, (3) nothing is significantly deteriorated (risk-aware: the
    inferiority tests; other corrections: a success metric significantly worse or a guardrail
    interval beyond its margin) and (4) the quality checks pass: no sample-ratio mismatch and, for
    a fixed-horizon analysis, the sample the power analysis asked for (a fixed-horizon test read
    before its planned sample would be a peek).
    """
    per_variant: dict[str, Any] = {}
    for variant in [v for v in inp.expected_split if v != inp.control]:
        rows = [c for c in comparisons if c["variant"] == variant]
        names = {id(c): inp.metrics[c["metric_index"]].name for c in rows}
        success = [c for c in rows if inp.metrics[c["metric_index"]].role == "success"]
        guard = [c for c in rows if inp.metrics[c["metric_index"]].role == "guardrail"]
        reasons: list[str] = []
        if not rows:
            per_variant[variant] = {"recommendation": "no-ship", "reasons": [f"no statistics for {variant}"]}
            continue
        if srm["mismatch"]:
            reasons.append(f"quality: sample ratio mismatch (chi-square p = {srm['p_value']:.2g} < "
                           f"{hypotheses.SRM_THRESHOLD}): the assignment or logging is broken, the results cannot "
                           "be trusted")
        worse = [c for c in rows if c["worse"]]
        for c in worse:
            det = c.get("deterioration")
            if det is not None:
                reasons.append(f"{names[id(c)]}: significantly deteriorated, {det['test']}: {det['evidence']}")
            elif inp.metrics[c["metric_index"]].role == "guardrail":
                reasons.append(f"{names[id(c)]}: significantly inferior beyond its margin, {c['test']}: interval "
                               f"[{c['ci_lower']:.4g}, {c['ci_upper']:.4g}] beyond {c['null_diff']:.4g}")
            else:
                reasons.append(f"{names[id(c)]}: significantly worse, {c['test']}: {c['evidence']}")
        better = [c for c in success if c["better"]]
        for c in better:
            reasons.append(f"{names[id(c)]}: significantly superior, {c['test']}: {c['evidence']}")
        if not success:
            reasons.append("the experiment has no success metric")
        elif not better:
            best = min(success, key=lambda c: c["p_value"] if c["p_value"] is not None else 2.0)
            reasons.append(f"no success metric is significantly superior (closest: {names[id(best)]}, "
                           f"{best['test']}: {best['evidence']})")
        unproven = [c for c in guard if not c["significant"]]
        for c in guard:
            shown = "non-inferior" if c["significant"] else "non-inferiority not shown"
            reasons.append(f"{names[id(c)]}: {shown}, {c['test']}: {c['evidence']}")
        required, powered_by = _required_sample(rows, names)
        short = inp.sequential is None and required > 0 and n_now < required
        if short:
            reasons.append(f"quality: {int(n_now)} of the {int(np.ceil(required))} units the power analysis of "
                           f"{powered_by} requires")
        if srm["mismatch"] or worse:
            recommendation = "no-ship"
        elif better and not unproven and not (short and running):
            recommendation = "ship"
        elif running:
            recommendation = "keep-running"
            plan = (f" ({int(n_now)} of {int(inp.sequential.expected_n)} planned units)" if inp.sequential is not None
                    else f" ({int(n_now)} units so far)")
            reasons.append("the planned sample is not complete yet" + plan)
        else:
            recommendation = "no-ship"
            reasons.append("the planned sample is complete without a significant win" if not better else
                           "the planned sample is complete without showing every guardrail non-inferior")
        per_variant[variant] = {"recommendation": recommendation, "reasons": reasons}
    shipping = [v for v, d in per_variant.items() if d["recommendation"] == "ship"]
    if shipping:
        best_variant = max(shipping, key=lambda v: sum(c["better"] for c in comparisons if c["variant"] == v))
        overall = "ship"
        reasons = [f"ship {best_variant}: " + "; ".join(per_variant[best_variant]["reasons"])]
    elif any(d["recommendation"] == "keep-running" for d in per_variant.values()):
        overall = "keep-running"
        reasons = [f"{v}: " + "; ".join(d["reasons"]) for v, d in per_variant.items()]
    else:
        overall = "no-ship"
        reasons = [f"{v}: " + "; ".join(d["reasons"]) for v, d in per_variant.items()]
    if warnings:
        reasons.append(f"{len(warnings)} warning(s), see `warnings`")
    return {"recommendation": overall, "reasons": reasons, "variants": per_variant}


def _metric_warnings(inp: StatsInput, cells: _Cells) -> list[str]:
    warnings: list[str] = []
    for i in range(cells.n.size):
        metric = inp.metrics[int(cells.metric[i])]
        if cells.n[i] < 2:
            warnings.append(f"metric {metric.name!r}: variant {cells.variant[i]!r} has {int(cells.n[i])} unit(s); "
                            "at least 2 are needed for a variance")
        elif cells.var_unit[i] == 0:
            warnings.append(f"metric {metric.name!r}: no variation in variant {cells.variant[i]!r} "
                            "(no events in the window?)")
    for metric in inp.metrics:
        missing = [v for v in inp.expected_split if v not in metric.variants]
        if missing:
            warnings.append(f"metric {metric.name!r}: no statistics for {', '.join(missing)}")
    return warnings


def compute_results(inp: StatsInput, *, computed_at: dt.datetime | None = None, running: bool | None = None,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The results document (contract 5) for `inp`.

    `running` says whether the experiment is still collecting data (a `keep-running` is then
    possible); by default it is running when a sequential plan has not reached `expected_n`, and
    a sequential plan that reached `expected_n` is never running.
    `extra` adds fields (e.g. the lake path's exclusion counts) without touching the contract's.
    """
    units, srm = _srm(inp)
    n_now = float(sum(units.values()))
    seq = inp.sequential
    looks = None
    if seq is not None:
        looks = [x for x in seq.looks if x < n_now] + [n_now] if n_now > 0 else list(seq.looks)
        looks = [x for x in looks if x > 0] or [1.0]
    cells, comparisons = _evaluate(inp, inp.metrics, n_now)
    warnings = _metric_warnings(inp, cells)
    if running is None:
        running = seq is not None and n_now < seq.expected_n
    elif seq is not None and n_now >= seq.expected_n:
        running = False  # the sequential plan is complete, whatever the calendar says
    decision = _decide(inp, comparisons, srm, running, warnings, n_now)

    metric_docs: list[dict[str, Any]] = []
    by_metric: dict[int, list[dict[str, Any]]] = {}
    for row in comparisons:
        by_metric.setdefault(row["metric_index"], []).append(row)
    cells_of: dict[int, list[int]] = {}
    for i, mi in enumerate(cells.metric.tolist()):
        cells_of.setdefault(mi, []).append(i)
    for mi, metric in enumerate(inp.metrics):
        mask = np.asarray(cells_of.get(mi, []), dtype=np.int64)
        doc: dict[str, Any] = {
            "metric": metric.name, "kind": metric.kind, "role": metric.role, "direction": metric.direction,
            "nim": metric.nim if metric.role == "guardrail" else None, "mde": metric.mde,
            "variants": [{"variant": cells.variant[i], "n": int(cells.n[i]), "mean": cells.raw_mean[i],
                          "adjusted_mean": cells.mean[i] if metric.cuped else None,
                          "std_err": math.sqrt(cells.var_mean[i]) if cells.var_mean[i] >= 0 else None}
                         for i in mask],
            "comparisons": [{k: v for k, v in c.items() if k != "metric_index"} for c in by_metric.get(mi, [])],
        }
        if metric.cuped:
            doc["cuped"] = {"theta": cells.theta[mask[0]] if mask.size else None,
                            "variance_reduction": {cells.variant[i]: cells.var_reduction[i] for i in mask}}
        metric_docs.append(doc)

    _add_history(inp, metric_docs)
    document: dict[str, Any] = {
        "experiment": inp.experiment,
        "computed_at": (computed_at or dt.datetime.now(dt.UTC)).isoformat().replace("+00:00", "Z"),
        "control": inp.control,
        "confidence_level": 1.0 - inp.alpha,
        "alpha": inp.alpha,
        "power": inp.power,
        "correction": inp.correction,
        "deterioration_alpha": inp.deterioration_level if inp.correction == "risk-aware" else None,
        "sequential": None if seq is None else {
            "method": seq.method, "expected_n": seq.expected_n, "looks": looks, "rho": seq.rho,
            "information_fraction": min(n_now / seq.expected_n, 1.0),
            "information": n_now / seq.expected_n,
            "spending": "lan-demets power family alpha * t^rho, bound for continuous monitoring"
            if seq.method == "group-sequential" else "normal-mixture confidence sequence"},
        "units": {v: int(n) for v, n in units.items()},
        "srm": srm,
        "metrics": metric_docs,
        "decision": decision,
        "warnings": warnings,
    }
    if extra:
        document.update(extra)
    return _clean(document)


def _add_history(inp: StatsInput, metric_docs: list[dict[str, Any]]) -> None:
    """Cumulative effect per look (for the report's chart), computed with the bounds of each look."""
    depth = max((len(m.history) for m in inp.metrics), default=0)
    if depth == 0:
        return
    per_metric: list[list[dict[str, Any]]] = [[] for _ in inp.metrics]
    for k in range(depth):
        present = [(mi, m) for mi, m in enumerate(inp.metrics) if len(m.history) > k]
        snapshot = [MetricInput(name=m.name, kind=m.kind, role=m.role, direction=m.direction, nim=m.nim,
                                variants=m.history[k], cuped=m.cuped, test=m.test) for _, m in present]
        look_n = float(sum(max((m.history[k][v].n for _, m in present if v in m.history[k]), default=0.0)
                           for v in inp.expected_split))
        if look_n <= 0:
            continue
        try:
            _, rows = _evaluate(inp, snapshot, look_n)
        except (ValueError, ZeroDivisionError):
            continue
        for row in rows:
            mi = present[row["metric_index"]][0]
            per_metric[mi].append({"look": k, "units": look_n, "variant": row["variant"], "diff": row["diff"],
                                   "ci_lower": row["ci_lower"], "ci_upper": row["ci_upper"],
                                   "relative_diff": row["relative_diff"],
                                   "relative_ci_lower": row["relative_ci_lower"],
                                   "relative_ci_upper": row["relative_ci_upper"],
                                   "statistic": row["statistic"], "significant": row["significant"],
                                   "sequential_bound": row["sequential_bound"]})
    for doc, rows in zip(metric_docs, per_metric, strict=True):
        doc["cumulative"] = rows
