"""Descriptive breakdowns of an experiment: per day (not cumulative) and per segment.

A breakdown compares the variants inside a subset of units (those first exposed on one day, or
those of one segment value) with the same estimators as the main analysis: each subset is run
through `compute_results` with no sequential plan and no multiplicity correction. These numbers
are for looking at trends and heterogeneity; they never feed the decision, which rests on the
cumulative, corrected test of the whole experiment. The document says so next to them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from analysis_worker.compute import compute_results
from analysis_worker.config import ExperimentConfig
from analysis_worker.inputs import StatsInput

NOTE = ("Per-subset intervals are nominal (no sequential or multiplicity correction) and describe the data; "
        "the recommendation rests on the whole experiment's test.")
_FIELDS = ("diff", "ci_lower", "ci_upper", "relative_diff", "relative_ci_lower", "relative_ci_upper", "p_value")


def subset_effects(experiment: ExperimentConfig, rows: list[dict[str, Any]],
                   to_input: Callable[[ExperimentConfig, list[dict[str, Any]]], StatsInput]
                   ) -> dict[str, Any]:
    """Units per variant and every metric's comparisons within `rows` (one subset's query rows)."""
    inp = to_input(experiment, rows)
    units = {v: int(n) for v, n in (inp.units or {}).items()}
    if sum(units.values()) == 0:
        return {"units": units, "metrics": {}}
    plain = dataclasses.replace(inp, sequential=None, correction="none",
                                metrics=[dataclasses.replace(m, history=[], mde=None) for m in inp.metrics])
    try:
        document = compute_results(plain, running=True)
    except (ValueError, ZeroDivisionError):
        return {"units": units, "metrics": {}}
    metrics = {m["metric"]: [{"variant": c["variant"], **{k: c.get(k) for k in _FIELDS}}
                             for c in m.get("comparisons", [])] for m in document.get("metrics", [])}
    return {"units": units, "metrics": metrics}


def daily(experiment: ExperimentConfig, rows: list[dict[str, Any]],
          to_input: Callable[[ExperimentConfig, list[dict[str, Any]]], StatsInput]) -> dict[str, Any]:
    """Per first-exposure day: units per variant and each metric's effect among that day's units."""
    days = sorted({r["day"] for r in rows})
    per_day = [subset_effects(experiment, [r for r in rows if r["day"] == d], to_input) for d in days]
    return {
        "dates": [d.isoformat() for d in days],
        "units": {v: [p["units"].get(v, 0) for p in per_day] for v in experiment.split},
        "metrics": {m.name: [[*p["metrics"].get(m.name, [])] for p in per_day] for m in experiment.metrics},
        "note": NOTE,
    }


def top_values(counts: Iterable[tuple[str, int]], limit: int) -> tuple[list[str], int]:
    """The `limit` values with the most units (ties by name) and how many values were left out."""
    ranked = sorted(counts, key=lambda kv: (-kv[1], kv[0]))
    return [k for k, _ in ranked[:limit]], max(0, len(ranked) - limit)
