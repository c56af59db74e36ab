"""The default `risk-aware` decision rule (Schultzberg, Ankargren & Frånberg 2024, arXiv 2402.11609)
and the agreement between each verdict and the intervals shown beside it.

Every number a reason states is checked against an independent computation on the same inputs:
statsmodels' unpooled two-proportion Wald test (`proportion.test_proportions_2indep`), scipy's chi-square and
normal distribution, statsmodels' power solver.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats import proportion
from statsmodels.stats.power import NormalIndPower

from analysis_worker.compute import compute_results
from analysis_worker.inputs import InputError, parse_input


def _binary(n: int, control: float, treatment: float, **extra: float) -> dict[str, dict[str, float]]:
    c, t = float(control), float(treatment)
    return {"control": {"n": n, "sum": c, "sum_sq": c}, "treatment": {"n": n, "sum": t, "sum_sq": t}, **extra}


def _doc(metrics: list[dict[str, Any]], *, running: bool | None = None, **kw: Any) -> dict[str, Any]:
    raw = {"alpha": 0.05, "power": 0.8, "correction": "risk-aware", "control": "control",
           "expected_split": {"control": 0.5, "treatment": 0.5}, "metrics": metrics}
    raw.update(kw)
    return compute_results(parse_input(raw), running=running)


def _cmp(doc: dict[str, Any], name: str, variant: str = "treatment") -> dict[str, Any]:
    metric = next(m for m in doc["metrics"] if m["metric"] == name)
    return next(c for c in metric["comparisons"] if c["variant"] == variant)


def _wald(control: tuple[int, int], treatment: tuple[int, int], alternative: str, value: float = 0.0) -> Any:
    return proportion.test_proportions_2indep(treatment[1], treatment[0], control[1], control[0], value=value,
                                   method="wald", compare="diff", alternative=alternative)


def test_a_significantly_worse_success_metric_blocks_shipping() -> None:
    """s1 significantly better, s2 significantly worse: the paper's rule says no-ship (today: ship)."""
    doc = _doc([{"name": "s1", "kind": "binary", "variants": _binary(20000, 2000, 2300)},
                {"name": "s2", "kind": "binary", "variants": _binary(20000, 5000, 4700)}])
    verdict = doc["decision"]["variants"]["treatment"]
    assert doc["decision"]["recommendation"] == verdict["recommendation"] == "no-ship"
    s1, s2 = _cmp(doc, "s1"), _cmp(doc, "s2")
    assert s1["better"] and s1["significant"]
    # s1's superiority test at alpha / (2 success metrics x 1 treatment), checked by statsmodels.
    ref = _wald((20000, 2000), (20000, 2300), "larger")
    assert s1["alpha"] == pytest.approx(0.025)
    assert s1["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    # s2's inferiority (deterioration) test, its own budget: deterioration_alpha / (2 metrics).
    det = s2["deterioration"]
    ref = _wald((20000, 5000), (20000, 4700), "smaller")
    assert det["alpha"] == pytest.approx(0.025)
    assert det["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert det["significant"] and s2["worse"]
    # The one-sided bound beside the verdict lies below 0, on both scales.
    assert det["bound"] < 0 and det["relative_bound"] < 0
    assert f"s2: significantly deteriorated, inferiority test (z-test): p = {ref.pvalue:.3g} < alpha 0.025" \
        in verdict["reasons"]


def test_a_guardrail_significantly_worse_within_its_margin_blocks_shipping() -> None:
    """A guardrail 1 % worse, significantly so, with a 5 % margin: non-inferior, yet deteriorated:
    the paper's rule (no success or guardrail metric significantly deteriorated) says no-ship."""
    doc = _doc([{"name": "conv", "kind": "binary", "variants": _binary(200000, 20000, 23000)},
                {"name": "retention", "kind": "binary", "role": "guardrail", "nim": 0.05,
                 "variants": _binary(200000, 100000, 99000)}])
    verdict = doc["decision"]["variants"]["treatment"]
    assert verdict["recommendation"] == "no-ship"
    guard = _cmp(doc, "retention")
    assert guard["significant"], "non-inferior at the 5 % margin"
    assert guard["relative_ci_lower"] > -0.05
    ref = _wald((200000, 100000), (200000, 99000), "smaller")
    det = guard["deterioration"]
    assert det["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert det["significant"]
    assert any(r.startswith("retention: significantly deteriorated, inferiority test") for r in verdict["reasons"])
    # The same guardrail with no significant deterioration ships.
    doc = _doc([{"name": "conv", "kind": "binary", "variants": _binary(200000, 20000, 23000)},
                {"name": "retention", "kind": "binary", "role": "guardrail", "nim": 0.05,
                 "variants": _binary(200000, 100000, 99900)}])
    assert doc["decision"]["recommendation"] == "ship"


def test_ship_reasons_name_each_metric_test_and_number() -> None:
    doc = _doc([{"name": "conv", "kind": "binary", "variants": _binary(20000, 2000, 2300)},
                {"name": "retention", "kind": "binary", "role": "guardrail", "nim": 0.05,
                 "variants": _binary(20000, 5000, 5010)}])
    assert doc["decision"]["recommendation"] == "ship"
    reasons = doc["decision"]["variants"]["treatment"]["reasons"]
    conv = _wald((20000, 2000), (20000, 2300), "larger")
    assert f"conv: significantly superior, superiority test (z-test): p = {conv.pvalue:.3g} < alpha 0.05" in reasons
    # Non-inferiority in ratio form: H0 p_t <= 0.95 p_c, with the control's own variance scaled by 0.95^2.
    p_c, p_t = 0.25, 5010 / 20000
    z = (p_t - 0.95 * p_c) / np.sqrt(p_t * (1 - p_t) / 20000 + 0.95**2 * p_c * (1 - p_c) / 20000)
    assert f"retention: non-inferior, non-inferiority test at margin 0.05 (z-test): p = {stats.norm.sf(z):.3g} " \
           "< alpha 0.05" in reasons


def test_alphas_and_power_of_the_risk_aware_design() -> None:
    """Two treatments, two success metrics, one guardrail: success at alpha / (2 x 2), guardrails at
    alpha / 2 (intersection-union: no correction over guardrails), deterioration at
    deterioration_alpha / 3 per treatment; beta shared by the deterioration and SRM budgets and
    split over guardrails + 1."""
    three = {"control": {"n": 30000, "sum": 3000, "sum_sq": 3000}, "a": {"n": 30000, "sum": 3200, "sum_sq": 3200},
             "b": {"n": 30000, "sum": 3100, "sum_sq": 3100}}
    doc = _doc([{"name": "s1", "kind": "binary", "mde": 0.05, "variants": three},
                {"name": "s2", "kind": "binary", "variants": three},
                {"name": "g", "kind": "binary", "role": "guardrail", "nim": 0.02, "variants": three}],
               expected_split={"control": 1, "a": 1, "b": 1}, deterioration_alpha=0.03)
    s1, g = _cmp(doc, "s1", "a"), _cmp(doc, "g", "b")
    assert s1["alpha"] == pytest.approx(0.05 / 4) and g["alpha"] == pytest.approx(0.05 / 2)
    assert s1["deterioration"]["alpha"] == pytest.approx(0.01) and g["deterioration"]["alpha"] == pytest.approx(0.01)
    beta = (0.2 - 0.03 - 0.001) / 2
    var_c, var_t = 0.1 * 0.9, (3200 / 30000) * (1 - 3200 / 30000)
    effect = 0.05 * 0.1 / np.sqrt((var_c + var_t) / 2)
    per_arm = NormalIndPower().solve_power(effect_size=effect, alpha=0.05 / 4, power=1 - beta, ratio=1.0,
                                           alternative="larger")
    # Three equal arms: the total is three times statsmodels' per-arm size.
    assert s1["required_units"] == pytest.approx(3 * per_arm, rel=1e-6)
    with pytest.raises(InputError, match="deterioration_alpha"):
        parse_input({"power": 0.9, "deterioration_alpha": 0.1, "correction": "risk-aware",
                     "metrics": [{"name": "m", "kind": "binary", "variants": _binary(10, 1, 2)}]})


def test_sample_ratio_mismatch_reason_states_the_chi_square_p_value() -> None:
    metrics = [{"name": "conv", "kind": "binary", "variants": {
        "control": {"n": 20000, "sum": 2000, "sum_sq": 2000}, "treatment": {"n": 21000, "sum": 2500, "sum_sq": 2500}}}]
    doc = _doc(metrics)
    ref = stats.chisquare([20000, 21000]).pvalue
    assert doc["srm"]["p_value"] == pytest.approx(ref, rel=1e-9)
    assert doc["decision"]["recommendation"] == "no-ship"
    assert doc["decision"]["variants"]["treatment"]["reasons"][0].startswith(
        f"quality: sample ratio mismatch (chi-square p = {ref:.2g} < 0.001)")


def test_fixed_horizon_waits_for_the_sample_its_power_analysis_requires() -> None:
    metrics = [{"name": "conv", "kind": "binary", "mde": 0.05, "variants": _binary(20000, 2000, 2300)}]
    running = _doc(metrics, running=True)
    verdict = running["decision"]["variants"]["treatment"]
    required = _cmp(running, "conv")["required_units"]
    assert required > 40000
    assert verdict["recommendation"] == "keep-running"
    assert f"quality: 40000 of the {int(np.ceil(required))} units the power analysis of conv requires" \
        in verdict["reasons"]
    # Over (the calendar says so), the win found with the smaller sample stands.
    assert _doc(metrics, running=False)["decision"]["recommendation"] == "ship"


@pytest.mark.parametrize("sequential", [None, {"method": "group-sequential", "expected_n": 30000},
                                        {"method": "always-valid", "expected_n": 30000}])
def test_every_interval_agrees_with_the_verdict_beside_it(sequential: dict[str, Any] | None) -> None:
    """Random experiments near every threshold: the absolute and the relative interval exclude the
    null exactly when the test rejects, for superiority, non-inferiority and deterioration."""
    rng = np.random.default_rng(13)
    checked = 0
    for _ in range(150):
        n = int(rng.integers(2000, 20000))
        base = rng.uniform(0.05, 0.5)
        ct = rng.binomial(n, [base, base * (1 + rng.normal(0, 0.06))])
        cg = rng.binomial(n, [base, base * (1 + rng.normal(-0.02, 0.04))])
        doc = _doc([{"name": "s", "kind": "binary", "variants": _binary(n, *ct)},
                    {"name": "g", "kind": "binary", "role": "guardrail", "nim": 0.03, "variants": _binary(n, *cg)}],
                   sequential=sequential)
        s, g = _cmp(doc, "s"), _cmp(doc, "g")
        assert (s["ci_lower"] > 0) == s["significant"] == (s["relative_ci_lower"] > 0)
        assert (g["relative_ci_lower"] > g["null_relative_diff"]) == g["significant"]
        for c in (s, g):
            det = c["deterioration"]
            assert (det["bound"] < 0) == det["significant"] == (det["relative_bound"] < 0)
            checked += det["significant"] + c["significant"]
    assert checked > 20  # the draws do reach the thresholds


def test_the_example_input_shows_no_interval_crossing_zero_beside_better() -> None:
    import json
    from pathlib import Path

    raw = json.loads((Path(__file__).resolve().parent.parent / "examples/experiments/stats-input.json").read_text())
    doc = compute_results(parse_input(raw))
    for metric in doc["metrics"]:
        for c in metric["comparisons"]:
            if c["better"]:
                assert c["relative_ci_lower"] > 0 and c["ci_lower"] > 0, metric["metric"]


def test_binary_metric_needs_no_sum_sq() -> None:
    with_sq = _doc([{"name": "conv", "kind": "binary", "variants": _binary(20000, 2000, 2300)}])
    without = _doc([{"name": "conv", "kind": "binary", "variants": {
        "control": {"n": 20000, "sum": 2000}, "treatment": {"n": 20000, "sum": 2300}}}])
    assert _cmp(without, "conv") == _cmp(with_sq, "conv")
    with pytest.raises(InputError, match="missing sum_sq"):
        parse_input({"metrics": [{"name": "m", "kind": "mean", "variants": {
            "control": {"n": 10, "sum": 1.0}, "treatment": {"n": 10, "sum": 2.0, "sum_sq": 3.0}}}]})


@pytest.mark.parametrize("correction", ["bonferroni", "holm", "none"])
def test_other_corrections_keep_their_rule(correction: str) -> None:
    doc = _doc([{"name": "s1", "kind": "binary", "variants": _binary(20000, 2000, 2300)},
                {"name": "s2", "kind": "binary", "variants": _binary(20000, 5000, 4700)}], correction=correction)
    s2 = _cmp(doc, "s2")
    assert s2["alternative"] == "two-sided" and s2["worse"] and "deterioration" not in s2
    assert doc["decision"]["recommendation"] == "no-ship"
