"""The statistics engine against independent libraries on the same inputs, and by simulation.

References: scipy.stats (Welch t, chi-square), statsmodels (OLS for CUPED, multipletests, power),
spotify-confidence (z test, non-inferiority, group-sequential bounds). Where the formula is the same
the tolerance is 1e-9 relative; where the reference solves numerically with another method
(sequential bounds, sample sizes) the tolerance says so.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
import pytest
import spotify_confidence as conf
import statsmodels.api as sm
from scipy import optimize, stats
from spotify_confidence.analysis.frequentist.sequential_bound_solver import bounds as spotify_bounds
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.weightstats import CompareMeans, DescrStatsW

from analysis_worker import hypotheses, sequential
from analysis_worker.compute import compute_results
from analysis_worker.inputs import InputError, MetricInput, SequentialInput, StatsInput, VariantStats, parse_input

RTOL = 1e-9


def _sums(x: np.ndarray) -> dict[str, float]:
    return {"n": float(x.size), "sum": float(x.sum()), "sum_sq": float(np.dot(x, x))}


def _doc(metrics: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    raw = {"alpha": 0.05, "power": 0.8, "correction": "none", "control": "control",
           "expected_split": {"control": 0.5, "treatment": 0.5}, "sequential": None, "metrics": metrics}
    raw.update(kw)
    return compute_results(parse_input(raw))


def _cmp(doc: dict[str, Any], metric: int = 0) -> dict[str, Any]:
    return doc["metrics"][metric]["comparisons"][0]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261126)


def test_welch_t_matches_scipy_and_statsmodels(rng: np.random.Generator) -> None:
    a = rng.lognormal(1.0, 0.7, 800)
    b = rng.lognormal(1.05, 0.9, 1100)
    c = _cmp(_doc([{"name": "revenue", "kind": "mean", "variants": {"control": _sums(a), "treatment": _sums(b)}}]))
    ref = stats.ttest_ind_from_stats(b.mean(), b.std(ddof=1), b.size, a.mean(), a.std(ddof=1), a.size,
                                     equal_var=False)
    assert c["method"] == "welch-t"
    assert c["statistic"] == pytest.approx(ref.statistic, rel=RTOL)
    assert c["p_value"] == pytest.approx(ref.pvalue, rel=RTOL)
    lo, hi = CompareMeans(DescrStatsW(b), DescrStatsW(a)).tconfint_diff(alpha=0.05, usevar="unequal")
    assert (c["ci_lower"], c["ci_upper"]) == (pytest.approx(lo, rel=RTOL), pytest.approx(hi, rel=RTOL))
    assert c["diff"] == pytest.approx(b.mean() - a.mean(), rel=RTOL)


def _spotify_ztest(control: dict[str, float], treatment: dict[str, float], **kw: Any) -> pd.Series:
    df = pd.DataFrame({"group": ["control", "treatment"], "num": [control["sum"], treatment["sum"]],
                       "sq": [control["sum_sq"], treatment["sum_sq"]], "n": [control["n"], treatment["n"]]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        test = conf.ZTest(df, numerator_column="num", numerator_sum_squares_column="sq", denominator_column="n",
                          categorical_group_columns="group", interval_size=0.95, correction_method="bonferroni")
        return test.difference(level_1="control", level_2="treatment", absolute=True, **kw).iloc[0]


def test_binary_z_test_matches_spotify_confidence() -> None:
    control = {"n": 10000, "sum": 1200.0, "sum_sq": 1200.0}
    treatment = {"n": 10050, "sum": 1300.0, "sum_sq": 1300.0}
    c = _cmp(_doc([{"name": "conversion", "kind": "binary", "variants": {"control": control, "treatment": treatment}}]))
    ref = _spotify_ztest(control, treatment)
    assert c["method"] == "z-test"
    assert c["diff"] == pytest.approx(ref["difference"], rel=RTOL)
    assert c["p_value"] == pytest.approx(ref["p-value"], rel=RTOL)
    assert c["ci_lower"] == pytest.approx(ref["ci_lower"], rel=RTOL)
    assert c["ci_upper"] == pytest.approx(ref["ci_upper"], rel=RTOL)


def test_mean_z_test_matches_spotify_confidence(rng: np.random.Generator) -> None:
    a, b = rng.normal(10, 3, 5000), rng.normal(10.2, 3.5, 5200)
    c = _cmp(_doc([{"name": "m", "kind": "mean", "test": "z",
                    "variants": {"control": _sums(a), "treatment": _sums(b)}}]))
    ref = _spotify_ztest(_sums(a), _sums(b))
    assert c["p_value"] == pytest.approx(ref["p-value"], rel=RTOL)
    assert c["ci_lower"] == pytest.approx(ref["ci_lower"], rel=RTOL)


def _fieller_reference(m_t: float, v_t: float, m_c: float, v_c: float, crit: float) -> tuple[float, float]:
    """The relative interval by inverting the ratio test numerically (scipy's brentq), not by the
    closed form the engine uses: every r whose test statistic stays within +-crit."""
    def excess(r: float) -> float:
        return abs(m_t - r * m_c) / np.sqrt(v_t + r * r * v_c) - crit

    centre = m_t / m_c
    lo = optimize.brentq(excess, centre - 50 * np.sqrt(v_t + v_c) / abs(m_c), centre, xtol=1e-14)
    hi = optimize.brentq(excess, centre, centre + 50 * np.sqrt(v_t + v_c) / abs(m_c), xtol=1e-14)
    return lo - 1.0, hi - 1.0


@pytest.mark.parametrize("direction", ["increase", "decrease"])
def test_non_inferiority_is_the_ratio_test_of_the_relative_margin(direction: str) -> None:
    """H0: mean_t <= (1 - nim) mean_c (increase), tested as (m_t - r0 m_c) / sqrt(v_t + r0^2 v_c):
    the relative margin with the control mean's own uncertainty, and the test its Fieller interval
    inverts, so the relative interval beside the verdict always agrees with it."""
    control = {"n": 10000, "sum": 1200.0, "sum_sq": 1200.0}
    treatment = {"n": 10050, "sum": 1190.0 if direction == "increase" else 1225.0,
                 "sum_sq": 1190.0 if direction == "increase" else 1225.0}
    doc = _doc([{"name": "retention", "kind": "binary", "role": "guardrail", "direction": direction, "nim": 0.05,
                 "variants": {"control": control, "treatment": treatment}}])
    c = _cmp(doc)
    p_c, p_t = control["sum"] / control["n"], treatment["sum"] / treatment["n"]
    v_c, v_t = p_c * (1 - p_c) / control["n"], p_t * (1 - p_t) / treatment["n"]
    r0 = 0.95 if direction == "increase" else 1.05
    z = (p_t - r0 * p_c) / np.sqrt(v_t + r0**2 * v_c)
    p_ref = stats.norm.sf(z) if direction == "increase" else stats.norm.cdf(z)
    assert c["alternative"] == ("greater" if direction == "increase" else "less")
    assert c["null_relative_diff"] == pytest.approx(r0 - 1, rel=RTOL)
    assert c["null_diff"] == pytest.approx((r0 - 1) * p_c, rel=RTOL)
    assert c["statistic"] == pytest.approx(z, rel=RTOL)
    assert c["p_value"] == pytest.approx(p_ref, rel=RTOL)
    assert c["significant"] == bool(p_ref < 0.05)
    lo, hi = _fieller_reference(p_t, v_t, p_c, v_c, stats.norm.isf(0.05))
    assert c["relative_ci_lower"] == pytest.approx(lo, rel=1e-9)
    assert c["relative_ci_upper"] == pytest.approx(hi, rel=1e-9)
    end = c["relative_ci_lower"] if direction == "increase" else c["relative_ci_upper"]
    assert (end > r0 - 1 if direction == "increase" else end < r0 - 1) == c["significant"]
    # The absolute interval is the plain z interval of the difference (spotify-confidence's).
    ref = _spotify_ztest(control, treatment)
    assert c["diff"] == pytest.approx(ref["difference"], rel=RTOL)


def test_srm_matches_scipy_chisquare() -> None:
    observed = np.array([10000.0, 10350.0, 9800.0])
    share = np.array([0.3, 0.4, 0.3])
    p, expected = hypotheses.srm_test(observed, share)
    ref = stats.chisquare(observed, share * observed.sum())
    assert p == pytest.approx(ref.pvalue, rel=RTOL)
    assert expected.sum() == pytest.approx(observed.sum())
    doc = _doc([{"name": "m", "kind": "binary", "variants": {
        "control": {"n": 10000, "sum": 10, "sum_sq": 10}, "treatment": {"n": 10400, "sum": 10, "sum_sq": 10}}}])
    assert doc["srm"]["p_value"] == pytest.approx(stats.chisquare([10000, 10400]).pvalue, rel=RTOL)
    # p ~ 0.005: unusual, but above the 0.001 alarm threshold.
    assert 0.001 < doc["srm"]["p_value"] < 0.01
    assert doc["srm"]["mismatch"] is False


def test_srm_mismatch_blocks_shipping() -> None:
    doc = _doc([{"name": "m", "kind": "binary", "variants": {
        "control": {"n": 10000, "sum": 1000, "sum_sq": 1000}, "treatment": {"n": 10800, "sum": 1500, "sum_sq": 1500}}}])
    assert doc["srm"]["p_value"] == pytest.approx(stats.chisquare([10000, 10800]).pvalue, rel=RTOL)
    assert doc["srm"]["mismatch"] is True
    assert _cmp(doc)["better"] is True
    assert doc["decision"]["recommendation"] == "no-ship"
    assert "sample ratio mismatch" in doc["decision"]["variants"]["treatment"]["reasons"][0]


def test_corrections_match_statsmodels_multipletests(rng: np.random.Generator) -> None:
    p = np.concatenate([rng.uniform(0, 0.02, 6), rng.uniform(0, 1, 10), [np.nan]])
    valid = np.isfinite(p)
    reject, adjusted, _, _ = multipletests(p[valid], alpha=0.05, method="holm")
    assert np.array_equal(hypotheses.holm_reject(p, 0.05)[valid], reject)
    assert not hypotheses.holm_reject(p, 0.05)[~valid].any()
    np.testing.assert_allclose(hypotheses.holm_adjusted(p)[valid], adjusted, rtol=RTOL)
    # Bonferroni through the engine: 4 metrics x 2 treatments = 8 comparisons.
    metrics = []
    for i in range(4):
        variants = {v: _sums(rng.normal(1.0 + 0.04 * i * (v != "control"), 1.0, 3000)) for v in ("control", "t1", "t2")}
        metrics.append({"name": f"m{i}", "kind": "mean", "variants": variants})
    split = {"control": 1, "t1": 1, "t2": 1}
    bonf = compute_results(parse_input({"correction": "bonferroni", "expected_split": split, "metrics": metrics}))
    holm = compute_results(parse_input({"correction": "holm", "expected_split": split, "metrics": metrics}))
    rows = [c for m in bonf["metrics"] for c in m["comparisons"]]
    ps = np.array([c["p_value"] for c in rows])
    b_reject = multipletests(ps, alpha=0.05, method="bonferroni")[0]
    h_reject = multipletests(ps, alpha=0.05, method="holm")[0]
    assert [c["significant"] for c in rows] == list(b_reject)
    assert [c["significant"] for m in holm["metrics"] for c in m["comparisons"]] == list(h_reject)
    assert all(c["alpha"] == pytest.approx(0.05 / 8) for c in rows)


def test_cuped_effect_equals_ols_and_se_equals_welch_on_adjusted_values(rng: np.random.Generator) -> None:
    n_c, n_t = 3000, 3300
    x_c, x_t = rng.gamma(2.0, 2.0, n_c), rng.gamma(2.0, 2.0, n_t)
    y_c = 0.8 * x_c + rng.normal(0, 1.5, n_c)
    y_t = 0.8 * x_t + 0.25 + rng.normal(0, 1.5, n_t)

    def cell(y: np.ndarray, x: np.ndarray) -> dict[str, float]:
        return {**_sums(y), "cov_sum": float(x.sum()), "cov_sum_sq": float(x @ x), "cov_prod_sum": float(x @ y)}

    doc = _doc([{"name": "revenue", "kind": "mean",
                 "variants": {"control": cell(y_c, x_c), "treatment": cell(y_t, x_t)}}])
    c = _cmp(doc)
    y = np.concatenate([y_c, y_t])
    x = np.concatenate([x_c, x_t])
    treat = np.concatenate([np.zeros(n_c), np.ones(n_t)])
    ols = sm.OLS(y, sm.add_constant(np.column_stack([treat, x]))).fit()
    assert c["method"] == "cuped-welch-t"
    assert c["diff"] == pytest.approx(ols.params[1], rel=RTOL)
    assert doc["metrics"][0]["cuped"]["theta"] == pytest.approx(ols.params[2], rel=RTOL)
    # With theta fixed, the interval is Welch's on the adjusted per-unit values.
    theta = ols.params[2]
    adj_c, adj_t = y_c - theta * x_c, y_t - theta * x_t
    ref = stats.ttest_ind(adj_t, adj_c, equal_var=False)
    assert c["p_value"] == pytest.approx(ref.pvalue, rel=1e-7)
    assert c["std_err"] == pytest.approx(np.sqrt(adj_t.var(ddof=1) / n_t + adj_c.var(ddof=1) / n_c), rel=RTOL)
    # The variance reduction is real and equals 1 - Var(adjusted) / Var(raw).
    reduction = doc["metrics"][0]["cuped"]["variance_reduction"]["control"]
    assert reduction == pytest.approx(1 - adj_c.var(ddof=1) / y_c.var(ddof=1), rel=RTOL)
    assert reduction > 0.5
    # And OLS's own (homoscedastic) standard error is close to ours.
    assert c["std_err"] == pytest.approx(ols.bse[1], rel=0.02)


def test_ratio_delta_method_matches_per_unit_linearisation(rng: np.random.Generator) -> None:
    def unit_data(n: int, rate: float) -> tuple[np.ndarray, np.ndarray]:
        sessions = rng.poisson(3.0, n) + 1
        clicks = rng.poisson(rate * sessions)
        return clicks.astype(float), sessions.astype(float)

    (y_c, x_c), (y_t, x_t) = unit_data(4000, 1.5), unit_data(4100, 1.55)

    def cell(y: np.ndarray, x: np.ndarray) -> dict[str, float]:
        return {**_sums(y), "den_sum": float(x.sum()), "den_sum_sq": float(x @ x), "prod_sum": float(x @ y)}

    c = _cmp(_doc([{"name": "ctr", "kind": "ratio",
                    "variants": {"control": cell(y_c, x_c), "treatment": cell(y_t, x_t)}}]))

    def ratio_var(y: np.ndarray, x: np.ndarray) -> tuple[float, float]:
        r = y.sum() / x.sum()
        cov = np.cov(np.vstack([y, x]), ddof=1)
        return r, float((cov[0, 0] - 2 * r * cov[0, 1] + r * r * cov[1, 1]) / (y.size * x.mean() ** 2))

    (r_c, v_c), (r_t, v_t) = ratio_var(y_c, x_c), ratio_var(y_t, x_t)
    assert c["method"] == "delta-method-z"
    assert c["diff"] == pytest.approx(r_t - r_c, rel=RTOL)
    assert c["std_err"] == pytest.approx(np.sqrt(v_c + v_t), rel=RTOL)
    z = (r_t - r_c) / np.sqrt(v_c + v_t)
    assert c["p_value"] == pytest.approx(2 * stats.norm.sf(abs(z)), rel=RTOL)
    lo, hi = _fieller_reference(r_t, v_t, r_c, v_c, stats.norm.isf(0.025))
    assert c["relative_ci_lower"] == pytest.approx(lo, rel=1e-9)
    assert c["relative_ci_upper"] == pytest.approx(hi, rel=1e-9)


@pytest.mark.parametrize("sides", [1, 2])
@pytest.mark.parametrize("looks", [[0.2, 0.4, 0.6, 0.8, 1.0], list(np.linspace(0.1, 1.0, 10)),
                                   [0.05, 0.3, 0.31, 0.7, 1.0]])
def test_group_sequential_bounds_match_spotify_confidence(looks: list[float], sides: int) -> None:
    t = np.asarray(looks)
    ours = sequential.group_sequential_bounds(t, 0.05, rho=2.0, sides=sides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = spotify_bounds(t, 0.05, rho=2, ztrun=8, sides=sides).df["zb"].to_numpy()
    # Both integrate the same recursion numerically with different grids: agree to ~1e-4.
    np.testing.assert_allclose(ours, theirs, rtol=5e-4)
    # A single final look is the fixed-horizon test.
    assert sequential.group_sequential_bounds([1.0], 0.05, sides=sides)[0] == pytest.approx(
        stats.norm.isf(0.05 / sides), rel=RTOL)


def test_sample_size_and_mde_match_statsmodels() -> None:
    power = NormalIndPower()
    # One-sided: the normal-approximation formula is exact, so statsmodels' root finder agrees tightly.
    sigma, effect, share_c, share_t = 2.0, 0.1, 0.5, 0.5
    total = hypotheses.required_units(np.array([sigma**2]), np.array([sigma**2]), np.array([share_c]),
                                      np.array([share_t]), np.array([effect]), np.array([0.05]), np.array([0.2]),
                                      np.array([1]))[0]
    n1 = power.solve_power(effect_size=effect / sigma, alpha=0.05, power=0.8, ratio=1.0, alternative="larger")
    assert total * share_c == pytest.approx(n1, rel=1e-6)
    # Unequal split: treatment gets 20%.
    total = hypotheses.required_units(np.array([sigma**2]), np.array([sigma**2]), np.array([0.8]), np.array([0.2]),
                                      np.array([effect]), np.array([0.05]), np.array([0.2]), np.array([1]))[0]
    n1 = power.solve_power(effect_size=effect / sigma, alpha=0.05, power=0.8, ratio=0.25, alternative="larger")
    assert total * 0.8 == pytest.approx(n1, rel=1e-6)
    # MDE for a given sample: invert statsmodels' power for the effect size.
    n = 5000.0
    mde = hypotheses.detectable_effect(np.array([sigma**2 / n]), np.array([sigma**2 / n]), np.array([0.05]),
                                       np.array([0.2]), np.array([1]))[0]
    es = power.solve_power(nobs1=n, alpha=0.05, power=0.8, ratio=1.0, alternative="larger")
    # statsmodels finds the effect size with a root finder of looser tolerance than for nobs.
    assert mde == pytest.approx(es * sigma, rel=1e-4)


def test_always_valid_sequence_formula() -> None:
    # The normal-mixture boundary: at V = tau^2 the half-width is sqrt(2 V (log 2 - 2 log alpha)).
    v = np.array([0.3])
    half = sequential.confidence_sequence_halfwidth(v, v, np.array([0.05]))
    assert half[0] == pytest.approx(np.sqrt(2 * 0.3 * (np.log(2) - 2 * np.log(0.05))), rel=RTOL)
    # The p-value is 1 / likelihood ratio; the interval excludes 0 exactly when p < alpha.
    for estimate in (0.5, 1.0, 1.5, 2.0):
        p = sequential.always_valid_p_value(np.array([estimate]), v, v)[0]
        assert (p < 0.05) == (abs(estimate) > half[0])
    # It is wider than the fixed-horizon interval at the same variance.
    assert half[0] > stats.norm.isf(0.025) * np.sqrt(0.3)


# ---------------------------------------------------------------- simulations (vectorised)
#
# Each simulated experiment is one metric of a single input, so the engine computes thousands of
# experiments in one vectorised pass. Normal data is drawn as exact sufficient statistics: for n
# draws of N(mu, 1) the sum is N(n mu, n) and, independently, sum_sq - sum^2 / n is chi-square
# with n - 1 degrees of freedom.
#
# The issue asks for 1,000 experiments and a false-positive rate within [0.04, 0.06]; at 1,000 that
# band is only +-1.45 binomial standard deviations, so a correct test would fail it about one run
# in seven. We simulate 10,000 experiments (still well under a second per pass) and check both the
# issue's band and a 3-standard-deviation band around the nominal rate.

SIMS = 10_000


def _normal_stats(rng: np.random.Generator, shape: tuple[int, ...], n: int, mu: float = 0.0
                  ) -> tuple[np.ndarray, np.ndarray]:
    total = rng.normal(n * mu, np.sqrt(n), size=shape)
    return total, rng.chisquare(n - 1, size=shape) + total**2 / n


def _mean_metrics(control: tuple[np.ndarray, np.ndarray], treatment: tuple[np.ndarray, np.ndarray],
                  n: float) -> list[MetricInput]:
    return [MetricInput(name=f"sim{i}", kind="mean", role="success", direction="increase", nim=0.0,
                        variants={"control": VariantStats(n, control[0][i], control[1][i]),
                                  "treatment": VariantStats(n, treatment[0][i], treatment[1][i])})
            for i in range(control[0].size)]


def _input(metrics: list[MetricInput], n: float, **kw: Any) -> StatsInput:
    return StatsInput(alpha=0.05, power=0.8, correction="none", control="control",
                      expected_split={"control": 0.5, "treatment": 0.5}, metrics=metrics,
                      units={"control": n, "treatment": n}, **kw)


def _significant(doc: dict[str, Any]) -> np.ndarray:
    return np.array([m["comparisons"][0]["significant"] for m in doc["metrics"]])


def _three_sd(p: float, sims: int) -> float:
    return 3 * np.sqrt(p * (1 - p) / sims)


def test_aa_false_positive_rate_fixed_horizon() -> None:
    rng = np.random.default_rng(1)
    n = 400
    doc = compute_results(_input(_mean_metrics(_normal_stats(rng, (SIMS,), n), _normal_stats(rng, (SIMS,), n), n), n))
    rate = _significant(doc).mean()
    assert 0.04 <= rate <= 0.06, rate
    assert abs(rate - 0.05) <= _three_sd(0.05, SIMS), rate


def test_aa_false_positive_rate_binary_and_ratio() -> None:
    rng = np.random.default_rng(2)
    sims, n = 4000, 2000
    conv = rng.binomial(n, 0.1, size=(sims, 2)).astype(float)
    metrics = [MetricInput(name=f"b{i}", kind="binary", role="success", direction="increase", nim=0.0,
                           variants={"control": VariantStats(n, conv[i, 0], conv[i, 0]),
                                     "treatment": VariantStats(n, conv[i, 1], conv[i, 1])}) for i in range(sims)]
    sessions = rng.poisson(3.0, size=(sims, 2, 300)) + 1.0
    clicks = rng.poisson(1.5 * sessions).astype(float)

    def ratio_cell(i: int, g: int) -> VariantStats:
        y, x = clicks[i, g], sessions[i, g]
        return VariantStats(300, y.sum(), y @ y, x.sum(), x @ x, x @ y)

    metrics += [MetricInput(name=f"r{i}", kind="ratio", role="success", direction="increase", nim=0.0,
                            variants={"control": ratio_cell(i, 0), "treatment": ratio_cell(i, 1)}) for i in range(sims)]
    sig = _significant(compute_results(_input(metrics, n)))
    for rate in (sig[:sims].mean(), sig[sims:].mean()):
        assert 0.04 <= rate <= 0.06, rate


def test_known_effect_is_covered_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(3)
    effect, n = 0.15, 400
    doc = compute_results(_input(_mean_metrics(_normal_stats(rng, (SIMS,), n),
                                               _normal_stats(rng, (SIMS,), n, effect), n), n))
    rows = [m["comparisons"][0] for m in doc["metrics"]]
    covered = np.mean([r["ci_lower"] <= effect <= r["ci_upper"] for r in rows])
    assert 0.935 <= covered <= 0.965, covered
    assert abs(covered - 0.95) <= _three_sd(0.95, SIMS), covered


def test_known_relative_effect_is_covered() -> None:
    rng = np.random.default_rng(6)
    n, base, lift = 400, 5.0, 0.04
    doc = compute_results(_input(_mean_metrics(_normal_stats(rng, (SIMS,), n, base),
                                               _normal_stats(rng, (SIMS,), n, base * (1 + lift)), n), n))
    rows = [m["comparisons"][0] for m in doc["metrics"]]
    covered = np.mean([r["relative_ci_lower"] <= lift <= r["relative_ci_upper"] for r in rows])
    assert abs(covered - 0.95) <= _three_sd(0.95, SIMS), covered


@pytest.mark.parametrize("method", ["group-sequential", "always-valid"])
def test_aa_false_positive_rate_with_ten_looks(method: str) -> None:
    rng = np.random.default_rng(4)
    per_look, looks = 100, 10
    # Per-look increments of each arm, accumulated into the statistics seen at each look.
    inc_c = _normal_stats(rng, (SIMS, looks), per_look)
    inc_t = _normal_stats(rng, (SIMS, looks), per_look)
    cum = [np.cumsum(a, axis=1) for a in (*inc_c, *inc_t)]
    ever = np.zeros(SIMS, dtype=bool)
    expected_total = 2.0 * per_look * looks
    for k in range(looks):
        n = float(per_look * (k + 1))
        metrics = _mean_metrics((cum[0][:, k], cum[1][:, k]), (cum[2][:, k], cum[3][:, k]), n)
        prior = [2.0 * per_look * (j + 1) for j in range(k)]
        doc = compute_results(_input(metrics, n, sequential=SequentialInput(method, expected_total, prior)))
        ever |= _significant(doc)
    rate = ever.mean()
    assert rate <= 0.05 + _three_sd(0.05, SIMS), rate
    if method == "group-sequential":
        # Bounds made for looking at any time give away part of alpha at ten looks, not most of it.
        assert rate >= 0.025, rate


def test_peeking_without_sequential_correction_inflates_errors() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(0, 1, size=(2, 1000, 10, 100))
    sums = np.cumsum(x.sum(axis=3), axis=2)
    sq = np.cumsum(np.einsum("gslk,gslk->gsl", x, x), axis=2)
    n = 100.0 * np.arange(1, 11)
    t = stats.ttest_ind_from_stats(sums[1] / n, np.sqrt((sq[1] - sums[1] ** 2 / n) / (n - 1)), n,
                                   sums[0] / n, np.sqrt((sq[0] - sums[0] ** 2 / n) / (n - 1)), n, equal_var=False)
    assert (t.pvalue < 0.05).any(axis=1).mean() > 0.12


# ---------------------------------------------------------------- decisions and bad input

def _binary(n: int, control: float, treatment: float) -> dict[str, dict[str, float]]:
    return {"control": {"n": n, "sum": control, "sum_sq": control},
            "treatment": {"n": n, "sum": treatment, "sum_sq": treatment}}


def test_risk_aware_decision_rule() -> None:
    good = _binary(20000, 2000, 2300)
    flat = _binary(20000, 5000, 5010)
    noisy = _binary(20000, 50, 52)
    doc = _doc([{"name": "conv", "kind": "binary", "role": "success", "variants": good},
                {"name": "retention", "kind": "binary", "role": "guardrail", "nim": 0.05, "variants": flat}],
               correction="risk-aware")
    assert doc["decision"]["recommendation"] == "ship"
    success, guard = _cmp(doc, 0), _cmp(doc, 1)
    # alpha corrected over success metrics only (1 here); guardrails keep alpha.
    assert success["alpha"] == pytest.approx(0.05) and guard["alpha"] == pytest.approx(0.05)
    assert success["alternative"] == "greater" and guard["alternative"] == "greater"
    # A guardrail whose non-inferiority is not shown blocks shipping; after the planned sample: no-ship.
    doc = _doc([{"name": "conv", "kind": "binary", "variants": good},
                {"name": "rare", "kind": "binary", "role": "guardrail", "nim": 0.01, "variants": noisy}],
               correction="risk-aware")
    assert doc["decision"]["recommendation"] == "no-ship"
    doc = _doc([{"name": "conv", "kind": "binary", "variants": good},
                {"name": "rare", "kind": "binary", "role": "guardrail", "nim": 0.01, "variants": noisy}],
               correction="risk-aware", sequential={"method": "group-sequential", "expected_n": 100000})
    assert doc["decision"]["recommendation"] == "keep-running"
    # Two success metrics: each gets alpha / 2.
    doc = _doc([{"name": "a", "kind": "binary", "variants": good}, {"name": "b", "kind": "binary", "variants": flat}],
               correction="risk-aware")
    assert [_cmp(doc, i)["alpha"] for i in (0, 1)] == [pytest.approx(0.025)] * 2


def test_significantly_worse_success_metric_is_no_ship() -> None:
    worse = _binary(20000, 2300, 2000)
    doc = _doc([{"name": "conv", "kind": "binary", "variants": worse}], correction="bonferroni")
    assert _cmp(doc)["worse"] is True
    assert doc["decision"]["recommendation"] == "no-ship"
    assert "conv: significantly worse, two-sided test (z-test): p = 1.27e-06 < alpha 0.05" in \
        doc["decision"]["variants"]["treatment"]["reasons"]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(alpha=1.5), "alpha"),
    (lambda d: d.update(correction="fdr"), "correction"),
    (lambda d: d["metrics"][0].update(kind="median"), "kind"),
    (lambda d: d["metrics"][0]["variants"]["control"].pop("sum_sq"), "missing sum_sq"),
    (lambda d: d["metrics"][0]["variants"]["control"].update(n=-3), "n"),
    (lambda d: d["metrics"][0]["variants"]["control"].update(sum="12"), "expected a number"),
    (lambda d: d["metrics"][0]["variants"].pop("control"), "control"),
    (lambda d: d["metrics"][0]["variants"].update(other={"n": 1, "sum": 1, "sum_sq": 1}), "not in expected_split"),
    (lambda d: d["metrics"][0].update(kind="ratio"), "den_sum"),
    (lambda d: d["metrics"][0]["variants"]["control"].update(sum_sq=1.0), "sum_sq is smaller"),
    (lambda d: d.update(sequential={"method": "bayesian", "expected_n": 10}), "sequential.method"),
    (lambda d: d.update(correction="holm", sequential={"method": "group-sequential", "expected_n": 10}), "holm"),
    (lambda d: d.update(metrics=[]), "metrics"),
])
def test_bad_input_is_refused_with_a_named_field(mutate: Any, message: str) -> None:
    raw = {"alpha": 0.05, "correction": "none", "control": "control",
           "expected_split": {"control": 0.5, "treatment": 0.5},
           "metrics": [{"name": "m", "kind": "mean", "variants": {
               "control": {"n": 100, "sum": 50.0, "sum_sq": 60.0},
               "treatment": {"n": 100, "sum": 55.0, "sum_sq": 70.0}}}]}
    mutate(raw)
    with pytest.raises(InputError, match=message):
        parse_input(raw)


def test_degenerate_cells_give_nulls_and_warnings_not_errors() -> None:
    doc = _doc([{"name": "empty", "kind": "mean", "variants": {
        "control": {"n": 100, "sum": 0.0, "sum_sq": 0.0}, "treatment": {"n": 0, "sum": 0.0, "sum_sq": 0.0}}}])
    c = _cmp(doc)
    assert c["p_value"] is None and c["significant"] is False
    assert any("0 unit(s)" in w for w in doc["warnings"])
    assert doc["srm"]["mismatch"] is True


def test_planning_helpers_match_statsmodels() -> None:
    from analysis_worker.planning import minimum_detectable_effect, sample_size

    p = 0.1
    var = p * (1 - p)
    total = sample_size(p, var, 0.05, alpha=0.05, power=0.8, sides=1)
    per_arm = NormalIndPower().solve_power(effect_size=0.05 * p / np.sqrt(var), alpha=0.05, power=0.8,
                                           ratio=1.0, alternative="larger")
    assert 2 * per_arm - 1e-6 <= total < 2 * per_arm + 1  # rounded up to whole units
    # The MDE of that sample size is (just under) the effect it was planned for.
    mde = minimum_detectable_effect(total, p, var, sides=1)
    assert mde == pytest.approx(0.05, rel=1e-3) and mde <= 0.05
    with pytest.raises(ValueError):
        sample_size(p, var, 0.0)


def test_always_valid_interval_covers_a_known_effect_at_every_look() -> None:
    rng = np.random.default_rng(7)
    sims, per_look, looks, effect = 4000, 100, 10, 0.2
    inc_c = _normal_stats(rng, (sims, looks), per_look)
    inc_t = _normal_stats(rng, (sims, looks), per_look, effect)
    cum = [np.cumsum(a, axis=1) for a in (*inc_c, *inc_t)]
    always = np.ones(sims, dtype=bool)
    for k in range(looks):
        n = float(per_look * (k + 1))
        metrics = _mean_metrics((cum[0][:, k], cum[1][:, k]), (cum[2][:, k], cum[3][:, k]), n)
        seq = SequentialInput("always-valid", 2.0 * per_look * looks, [2.0 * per_look * (j + 1) for j in range(k)])
        doc = compute_results(_input(metrics, n, sequential=seq))
        always &= np.array([m["comparisons"][0]["ci_lower"] <= effect <= m["comparisons"][0]["ci_upper"]
                            for m in doc["metrics"]])
    # Simultaneous coverage over all ten looks, not just at the end.
    assert always.mean() >= 0.95, always.mean()
