"""Sequential tests under the way `serve-analysis` runs: a recompute every 15 minutes for weeks,
and experiments that run past their plan.

The guarantee (docs/analysis.md): under no true effect, the probability of ever publishing a
`significant` (or, with one success metric, a `ship`) stays at most alpha. The simulation takes
every number that decides a verdict from what the worker itself publishes: for each recompute of
the schedule, the results document of that look (`compute_results` on statistics of exactly
that size, with the daily looks the lake path passes) goes through the experiment's look log
(`LookLog.publish`, which closes a group-sequential test at its plan); the simulated z paths are
then compared with the published critical values, looks whose published document is a frozen
earlier one deciding nothing new. Paths are Brownian motion in information time, drawn in numpy.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from analysis_worker.compute import compute_results
from analysis_worker.inputs import MetricInput, SequentialInput, StatsInput, VariantStats
from analysis_worker.looks import LookLog

ALPHA = 0.05
PLAN = 100_000.0  # expected units
PER_DAY, PLAN_DAYS = 96, 14
SIMS = 20_000


def _schedule(days: int) -> np.ndarray:
    """Units at each recompute (every 15 minutes): arrivals follow a daily cycle; the plan's
    units are reached at the end of day 14."""
    slot = np.arange(days * PER_DAY)
    weight = 1.0 + 0.8 * np.sin(2 * np.pi * (slot % PER_DAY) / PER_DAY)
    units = np.cumsum(weight)
    return units / units[PLAN_DAYS * PER_DAY - 1] * PLAN


def _input(units: float, day_looks: list[float], method: str, correction: str) -> StatsInput:
    """A look with `units` units, unit variance exactly 1 and no effect: only the critical value matters."""
    half = units / 2
    cell = VariantStats(n=half, sum=0.0, sum_sq=half - 1)
    metric = MetricInput(name="m", kind="mean", role="success", direction="increase", nim=0.0,
                         variants={"control": cell, "treatment": cell}, test="z")
    return StatsInput(alpha=ALPHA, power=0.8, correction=correction, control="control",
                      expected_split={"control": 0.5, "treatment": 0.5}, metrics=[metric],
                      sequential=SequentialInput(method, PLAN, day_looks), units={"control": half, "treatment": half})


def _published_critical_values(units: np.ndarray, method: str, correction: str, tmp: Path) -> np.ndarray:
    """The critical value on the z scale of every look's published verdict; NaN where the
    published document is a frozen earlier look (a closed test publishes nothing new)."""
    log = LookLog.load(tmp, f"{method}-{correction}")
    start = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    critical = np.full(units.size, np.nan)
    for k, n in enumerate(units):
        day = k // PER_DAY
        day_looks = [float(units[d * PER_DAY - 1]) for d in range(1, day + 1)]
        document = compute_results(_input(float(n), day_looks, method, correction), running=None)
        published = log.publish(document, now=start + dt.timedelta(minutes=15 * (k + 1)))
        if "current" not in published:
            comparison = published["metrics"][0]["comparisons"][0]
            assert comparison["alternative"] == ("greater" if correction == "risk-aware" else "two-sided")
            critical[k] = comparison["critical_value"]
    log.save()
    return critical


def _false_positive_rate(units: np.ndarray, critical: np.ndarray, sides: int, seed: int) -> float:
    """Share of simulated A/A experiments whose z ever crosses a published critical value."""
    rng = np.random.default_rng(seed)
    t = units / PLAN
    step = np.sqrt(np.diff(t, prepend=0.0))
    live = np.isfinite(critical)
    bound = np.where(live, critical, np.inf)
    ever = 0
    for _ in range(SIMS // 2000):
        score = np.cumsum(rng.standard_normal((2000, t.size)) * step, axis=1)
        z = score / np.sqrt(t)
        crossed = (np.abs(z) if sides == 2 else z) >= bound
        ever += int(crossed.any(axis=1).sum())
    return ever / SIMS


@pytest.mark.parametrize("method", ["group-sequential", "always-valid"])
def test_false_positive_rate_every_15_minutes_for_14_days_and_past_the_plan(method: str, tmp_path: Path) -> None:
    limit = ALPHA + 3 * np.sqrt(ALPHA * (1 - ALPHA) / SIMS)
    rates: dict[str, float] = {}
    for label, days in (("plan", PLAN_DAYS), ("overrun-1.5x", PLAN_DAYS * 3 // 2)):
        units = _schedule(days)
        for correction, sides in (("none", 2), ("risk-aware", 1)):
            critical = _published_critical_values(units, method, correction, tmp_path / label)
            rates[f"{label}/{sides}-sided"] = _false_positive_rate(units, critical, sides, seed=days * 10 + sides)
            if method == "group-sequential" and label != "plan":
                # Closed at the plan: past it, every recompute republishes the last look within it.
                assert np.isnan(critical[units > PLAN]).all()
                assert np.isfinite(critical[units <= PLAN]).all()
    print(method, {k: round(v, 4) for k, v in rates.items()}, f"limit {limit:.4f}, {SIMS} runs each")
    assert all(rate <= limit for rate in rates.values()), rates
    if method == "group-sequential":
        # Not conservative beyond reason: the bounds still spend most of alpha.
        assert min(rates.values()) >= 0.03, rates


def test_a_group_sequential_test_closes_at_its_plan(tmp_path: Path) -> None:
    """Past the plan the last look within it is republished, frozen; a keep-running becomes no-ship."""
    log = LookLog.load(tmp_path, "exp")
    inside = compute_results(_input(90_000, [], "group-sequential", "risk-aware"))
    assert inside["decision"]["recommendation"] == "keep-running"
    first = log.publish(inside)
    assert first["sequential"]["status"] == "open" and first["sequential"]["look"] == 1
    past = compute_results(_input(110_000, [], "group-sequential", "risk-aware"))
    second = log.publish(past)
    assert second["sequential"]["status"] == "closed" and second["sequential"]["closed_at_look"] == 1
    assert second["metrics"] == first["metrics"]
    assert second["decision"]["recommendation"] == "no-ship"
    assert second["current"]["units"] == {"control": 55_000, "treatment": 55_000}
    assert [look["units"] for look in second["sequential"]["looks_taken"]] == [90_000]
    # A restart reads the log back and stays closed.
    log.save()
    again = LookLog.load(tmp_path, "exp").publish(past)
    assert again["sequential"]["status"] == "closed" and again["metrics"] == first["metrics"]


def test_always_valid_looks_are_recorded_and_never_close(tmp_path: Path) -> None:
    log = LookLog.load(tmp_path, "av")
    for units in (50_000, 100_000, 150_000):
        published = log.publish(compute_results(_input(units, [], "always-valid", "none")))
        assert published["sequential"]["status"] == "open" and "current" not in published
    assert [look["units"] for look in published["sequential"]["looks_taken"]] == [50_000, 100_000, 150_000]


def test_the_bound_depends_on_the_information_alone() -> None:
    """Whatever looks came before (the days passed in, or none), a look's bound is the same."""
    def bound(day_looks: list[float]) -> Any:
        doc = compute_results(_input(60_000, day_looks, "group-sequential", "none"))
        return doc["metrics"][0]["comparisons"][0]["sequential_bound"]

    assert bound([]) == bound([10_000.0, 20_000.0, 50_000.0]) == bound([float(x) for x in range(1000, 60_000, 1000)])
