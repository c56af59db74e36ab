"""From a validated `StatsInput` to the results document of contract 5.

What is tested, at which alpha, and how the answer becomes a recommendation:

* Success metrics are tested two-sided for a difference (corrections `none`, `bonferroni`,
  `holm`), or one-sided for superiority in their preferred direction (`risk-aware`).
* Guardrails are always one-sided non-inferiority tests: H0 says the treatment is worse than the
  control by at least `nim` (relative to the control mean), e.g. for `direction: increase`
  H0: diff <= -nim * |control mean|. `nim` 0 tests "not worse at all".
* Alpha per comparison: `none` alpha; `bonferroni` alpha / (all comparisons); `holm` Holm's
  step-down over all comparisons (intervals at the Bonferroni level); `risk-aware` (Schultzberg,
  Kjellin & Rydberg, Spotify 2024) alpha / (success metrics x treatments) for success metrics and
  alpha / treatments for guardrails (all guardrails must pass, so they need no multiplicity
  correction), and power 1 - beta / (guardrails + 1) in sample-size planning.
* Intervals of one-sided tests are two-sided at level 1 - 2 alpha, so their relevant end is the
  one-sided bound the test uses.
* Sequential: `group-sequential` compares the statistic with the Lan-DeMets bound of the current
  look (the p-value stays the nominal fixed-horizon one, the interval uses the bound);
  `always-valid` reports the normal-mixture confidence sequence and its always-valid p-value.
* Recommendation per treatment: `ship` when at least one success metric is significantly better
  and every guardrail is significantly non-inferior (and no sample-ratio mismatch); `no-ship`
  when the sample ratio is off, a success metric is significantly worse, a guardrail is
  significantly inferior, or the planned sample is complete without a win; `keep-running`
  otherwise. The document's recommendation is `ship` if some treatment ships.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from numpy.typing import NDArray

from analysis_worker import estimators, hypotheses, sequential
from analysis_worker.inputs import MetricInput, StatsInput, VariantStats

Array = NDArray[np.float64]


@lru_cache(maxsize=256)
def _gs_bounds(t: tuple[float, ...], alpha: float, rho: float, sides: int) -> tuple[float, ...]:
    return tuple(float(b) for b in sequential.group_sequential_bounds(t, alpha, rho, sides))


def _gs_bound(t: tuple[float, ...], alpha: float, rho: float, sides: int, full: tuple[float, ...] | None) -> float:
    """The bound of the last look of `t`; a look's bound depends only on the looks up to it, so
    when `t` is a prefix of `full` (the cumulative chart's earlier looks) the full run is reused."""
    if full is not None and len(full) >= len(t) and full[:len(t)] == t:
        return _gs_bounds(full, alpha, rho, sides)[len(t) - 1]
    return _gs_bounds(t, alpha, rho, sides)[-1]


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


def _evaluate(inp: StatsInput, metrics: list[MetricInput], looks: list[float] | None,
              n_now: float, all_looks: list[float] | None = None) -> tuple[_Cells, list[dict[str, Any]]]:
    """Estimates and every comparison (metric x treatment) for one snapshot of the statistics."""
    order = list(inp.expected_split)
    cells = _build_cells(metrics, inp.control, order)
    treatments = [v for v in order if v != inp.control]
    successes = sum(m.role == "success" for m in metrics)
    guardrails = len(metrics) - successes

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
    nim = np.asarray([m.nim for m in mets], dtype=float)
    welch = np.asarray([m.test == "welch-t" and m.kind == "mean" for m in mets], dtype=bool)

    one_sided = (role == "guardrail") | (inp.correction == "risk-aware")
    alternative = np.where(one_sided, np.where(direction == "increase", "greater", "less"), "two-sided")
    sides = np.where(one_sided, 1, 2)
    mean_c = cells.mean[c]
    null = np.where(role == "guardrail", np.where(direction == "increase", -1.0, 1.0) * nim * np.abs(mean_c), 0.0)
    rel_null = np.where(role == "guardrail", np.where(direction == "increase", -1.0, 1.0) * nim, 0.0)

    if inp.correction == "none":
        alpha = np.full(count, inp.alpha)
    elif inp.correction in ("bonferroni", "holm"):
        alpha = np.full(count, inp.alpha / max(count, 1))
    else:  # risk-aware
        alpha = np.where(role == "success", inp.alpha / max(successes * len(treatments), 1),
                         inp.alpha / max(len(treatments), 1))
    beta = 1.0 - inp.power
    if inp.correction == "risk-aware":
        beta = beta / (guardrails + 1)

    diff = cells.mean[t] - mean_c
    var = cells.var_mean[t] + cells.var_mean[c]
    se = np.sqrt(var)
    df = np.where(welch, hypotheses.welch_df(cells.var_mean[t], cells.n[t], cells.var_mean[c], cells.n[c]), np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        statistic = np.where(se > 0, (diff - null) / se, np.nan)
    p = hypotheses.p_values(statistic, df, alternative)
    rel, rel_se = hypotheses.relative_difference(cells.mean[t], cells.var_mean[t], mean_c, cells.var_mean[c])

    seq = inp.sequential
    bound = np.full(count, np.nan)
    if seq is None:
        multiplier = hypotheses.quantile(alpha / sides, df)
        if inp.correction == "holm":
            significant = hypotheses.holm_reject(p, inp.alpha)
        else:
            significant = p < alpha
    elif seq.method == "group-sequential":
        fractions = tuple(float(min(x / seq.expected_n, 1.0)) for x in (looks or [n_now]))
        full = None if all_looks is None else tuple(float(min(x / seq.expected_n, 1.0)) for x in all_looks)
        bound = np.asarray([_gs_bound(fractions, float(a), seq.rho, int(s), full)
                            for a, s in zip(alpha, sides, strict=True)])
        multiplier = hypotheses.t_equivalent(bound, df)
        z = hypotheses.normal_equivalent(statistic, df)
        crossed = np.where(alternative == "greater", z >= bound,
                           np.where(alternative == "less", z <= -bound, np.abs(z) >= bound))
        significant = crossed & np.isfinite(statistic)
    else:  # always-valid
        alpha_cs = np.where(sides == 1, 2 * alpha, alpha)
        with np.errstate(divide="ignore", invalid="ignore"):
            expected_var = var * n_now / seq.expected_n
            tau2 = np.asarray([sequential.mixture_tau2(float(v), float(a)) for v, a in zip(expected_var, alpha_cs,
                                                                                          strict=True)])
            half = sequential.confidence_sequence_halfwidth(var, tau2, alpha_cs)
            multiplier = np.where(se > 0, half / se, np.nan)
            p_two = sequential.always_valid_p_value(diff - null, var, tau2)
        right_side = np.where(alternative == "greater", diff > null, diff < null)
        p = np.where(sides == 2, p_two, np.where(right_side, p_two / 2, 1 - p_two / 2))
        significant = p < alpha
    significant = significant & np.isfinite(p)

    lower, upper = diff - multiplier * se, diff + multiplier * se
    rel_lower, rel_upper = rel - multiplier * rel_se, rel + multiplier * rel_se
    improves = np.where(direction == "increase", diff > 0, diff < 0)
    powered = hypotheses.detectable_effect(cells.var_mean[c], cells.var_mean[t], alpha, beta, sides)
    shares = inp.expected_split
    share_c = np.full(count, shares[inp.control])
    share_t = np.asarray([shares[cells.variant[i]] for i in t], dtype=float)
    mde = np.asarray([np.nan if m.mde is None else m.mde for m in mets], dtype=float)
    required = hypotheses.required_units(cells.var_unit[c], cells.var_unit[t], share_c, share_t,
                                         mde * np.abs(mean_c), alpha, beta, sides)
    # Inferiority is established when the whole interval lies on the wrong side of the margin.
    inferior = np.where(direction == "increase", upper < null, lower > null) & np.isfinite(se) & (se > 0)
    seq_label = "" if seq is None else f", {seq.method}"

    comparisons: list[dict[str, Any]] = []
    for k in range(count):
        metric = mets[k]
        comparisons.append({
            "metric_index": int(cells.metric[t[k]]),
            "variant": cells.variant[t[k]],
            "baseline": inp.control,
            "diff": diff[k], "ci_lower": lower[k], "ci_upper": upper[k], "p_value": p[k],
            "relative_diff": rel[k], "relative_ci_lower": rel_lower[k], "relative_ci_upper": rel_upper[k],
            "method": _method(metric) + seq_label,
            "significant": bool(significant[k]),
            "alternative": str(alternative[k]),
            "null_diff": null[k], "null_relative_diff": rel_null[k],
            "std_err": se[k], "statistic": statistic[k], "df": df[k], "alpha": alpha[k],
            "critical_value": multiplier[k], "sequential_bound": bound[k],
            "improves": bool(improves[k]),
            "better": bool(significant[k] and improves[k] and metric.role == "success"),
            "worse": bool(metric.role == "success" and significant[k] and not improves[k]
                          and alternative[k] == "two-sided") or bool(metric.role == "guardrail" and inferior[k]),
            "powered_effect": powered[k], "required_units": required[k],
        })
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


def _decide(inp: StatsInput, comparisons: list[dict[str, Any]], srm: dict[str, Any], running: bool,
            warnings: list[str]) -> dict[str, Any]:
    per_variant: dict[str, Any] = {}
    for variant in [v for v in inp.expected_split if v != inp.control]:
        rows = [c for c in comparisons if c["variant"] == variant]
        names = {id(c): inp.metrics[c["metric_index"]].name for c in rows}
        success = [c for c in rows if inp.metrics[c["metric_index"]].role == "success"]
        guard = [c for c in rows if inp.metrics[c["metric_index"]].role == "guardrail"]
        reasons: list[str] = []
        better = [names[id(c)] for c in success if c["better"]]
        worse = [names[id(c)] for c in rows if c["worse"]]
        unproven = [names[id(c)] for c in guard if not c["significant"]]
        if srm["mismatch"]:
            reasons.append(f"sample ratio mismatch (p = {srm['p_value']:.2g} < {hypotheses.SRM_THRESHOLD}): "
                           "the assignment or logging is broken, the results cannot be trusted")
        if worse:
            reasons.append(f"significantly worse: {', '.join(worse)}")
        if better:
            reasons.append(f"significantly better: {', '.join(better)}")
        elif success:
            reasons.append("no success metric is significantly better")
        else:
            reasons.append("the experiment has no success metric")
        if guard and not unproven:
            reasons.append("every guardrail is significantly non-inferior")
        elif unproven:
            reasons.append(f"non-inferiority not shown yet: {', '.join(unproven)}")
        if not rows:
            recommendation = "no-ship"
            reasons = [f"no statistics for {variant}"]
        elif srm["mismatch"] or worse:
            recommendation = "no-ship"
        elif better and not unproven:
            recommendation = "ship"
        elif running:
            recommendation = "keep-running"
            reasons.append("the planned sample is not complete yet")
        else:
            recommendation = "no-ship"
            reasons.append("the planned sample is complete without a significant win" if not better else
                           "the planned sample is complete without showing every guardrail non-inferior")
        per_variant[variant] = {"recommendation": recommendation, "reasons": reasons}
    shipping = [v for v, d in per_variant.items() if d["recommendation"] == "ship"]
    if shipping:
        best = max(shipping, key=lambda v: sum(c["better"] for c in comparisons if c["variant"] == v))
        overall = "ship"
        reasons = [f"ship {best}: " + "; ".join(per_variant[best]["reasons"])]
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
    cells, comparisons = _evaluate(inp, inp.metrics, looks, n_now)
    warnings = _metric_warnings(inp, cells)
    if running is None:
        running = seq is not None and n_now < seq.expected_n
    elif seq is not None and n_now >= seq.expected_n:
        running = False  # the sequential plan is complete, whatever the calendar says
    decision = _decide(inp, comparisons, srm, running, warnings)

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

    _add_history(inp, metric_docs, looks)
    document: dict[str, Any] = {
        "experiment": inp.experiment,
        "computed_at": (computed_at or dt.datetime.now(dt.UTC)).isoformat().replace("+00:00", "Z"),
        "control": inp.control,
        "confidence_level": 1.0 - inp.alpha,
        "alpha": inp.alpha,
        "power": inp.power,
        "correction": inp.correction,
        "sequential": None if seq is None else {
            "method": seq.method, "expected_n": seq.expected_n, "looks": looks, "rho": seq.rho,
            "information_fraction": min(n_now / seq.expected_n, 1.0),
            "spending": "lan-demets power family alpha * t^rho" if seq.method == "group-sequential"
            else "normal-mixture confidence sequence"},
        "units": {v: int(n) for v, n in units.items()},
        "srm": srm,
        "metrics": metric_docs,
        "decision": decision,
        "warnings": warnings,
    }
    if extra:
        document.update(extra)
    return _clean(document)


def _add_history(inp: StatsInput, metric_docs: list[dict[str, Any]], all_looks: list[float] | None) -> None:
    """Cumulative effect per look (for the report's chart), computed with the bounds of each look."""
    depth = max((len(m.history) for m in inp.metrics), default=0)
    if depth == 0:
        return
    seq = inp.sequential
    per_metric: list[list[dict[str, Any]]] = [[] for _ in inp.metrics]
    for k in range(depth):
        present = [(mi, m) for mi, m in enumerate(inp.metrics) if len(m.history) > k]
        snapshot = [MetricInput(name=m.name, kind=m.kind, role=m.role, direction=m.direction, nim=m.nim,
                                variants=m.history[k], cuped=m.cuped, test=m.test) for _, m in present]
        look_n = float(sum(max((m.history[k][v].n for _, m in present if v in m.history[k]), default=0.0)
                           for v in inp.expected_split))
        if look_n <= 0:
            continue
        looks = None
        if seq is not None:
            prior = [x for x in seq.looks if x < look_n]
            looks = [*prior, look_n]
        try:
            _, rows = _evaluate(inp, snapshot, looks, look_n, all_looks)
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
