"""The demo's flag, its experiment definition, and the check of results against the truth.

The flag `home-ranking` splits users evenly over three systems: the static experience
(editorial theme for everyone), the XGBoost ranker and the LinUCB bandit. The experiment
measures conversion (success), revenue per user (success) and bounce (guardrail, no true
effect). `check_recovery` compares every interval of the results document (DESIGN.md
contract 5) with the true effect the world implies.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import yaml

from twofold.demo import world
from twofold.demo.train import BANDIT, RANKER, Truth

FLAG = "home-ranking"
CLIENT_SECRET = "demo-backend-secret"
ARMS = ("static", "ranker", "bandit")
MEAN_BASKET = 40.0  # purchases are uniform on [20, 60]
WINDOW = "1h"
PRIMARY = "conversion"


def flags_yaml() -> str:
    """The flag folder's contents: the experiment flag and the demo's client credential."""
    docs = [
        {"flag": FLAG,
         "description": "Which system ranks the home page best: static, the XGBoost ranker or the bandit?",
         "variants": {
             "static": {"system": "static", "theme": world.STATIC_THEME},
             "ranker": {"system": "model", "model": RANKER, "top_k": 1,
                        "fallback": {"theme": world.STATIC_THEME}},
             "bandit": {"system": "bandit", "model": BANDIT, "fallback": {"theme": world.STATIC_THEME}},
         },
         "default": "static",
         # Recorded with each exposure: the analysis breaks every metric down by country.
         "dimensions": ["country"],
         "rules": [{"name": "ranking-test",
                    "experiment": {"allocation": "100%", "arms": {arm: 1 for arm in ARMS}}}]},
        {"client": "demo-backend", "secrets": [{"secret": CLIENT_SECRET}]},
    ]
    return yaml.safe_dump_all(docs, sort_keys=False)


def experiment_config(start: dt.datetime, end: dt.datetime | None = None) -> dict[str, Any]:
    """The analysis worker's experiment definition (see docs/analysis.md)."""
    config: dict[str, Any] = {
        "name": FLAG,
        "description": "static vs XGBoost ranker vs LinUCB bandit on the home page",
        "flag": FLAG,
        "variants": [{"name": arm, "weight": 1 / len(ARMS)} for arm in ARMS],
        "control": "static",
        "start": start.isoformat(),
        "alpha": 0.05,
        "correction": "bonferroni",
        "dimensions": ["country"],
        "metrics": [
            {"name": "conversion", "kind": "binary", "event": "purchase", "window": WINDOW,
             "role": "success", "direction": "increase"},
            {"name": "revenue", "kind": "mean", "event": "purchase", "aggregate": "sum", "window": WINDOW,
             "role": "success", "direction": "increase"},
            {"name": "bounce", "kind": "binary", "event": "bounce", "window": WINDOW,
             "role": "guardrail", "direction": "decrease", "nim": 0.15},
        ],
    }
    if end is not None:
        config["end"] = end.isoformat()
    return config


def true_effects(truth: Truth) -> dict[tuple[str, str], float]:
    """(metric, arm) -> the true difference of that arm's mean from the static experience's."""
    effects: dict[tuple[str, str], float] = {}
    for arm in ARMS[1:]:
        lift = truth.lift(arm)
        effects[("conversion", arm)] = lift
        effects[("revenue", arm)] = lift * MEAN_BASKET
        effects[("bounce", arm)] = 0.0
    return effects


@dataclass(frozen=True)
class Check:
    """One interval of the results compared with the truth."""

    metric: str
    arm: str
    true_diff: float
    diff: float
    ci_lower: float
    ci_upper: float
    significant: bool
    covered: bool
    primary: bool
    # Probability that this interval misses the truth (two-sided: alpha; a guardrail's interval
    # around a one-sided test: 2 * alpha).
    miss_rate: float


@dataclass
class Recovery:
    checks: list[Check]
    srm_ok: bool
    srm_p: float
    problems: list[str]  # any of these: not recovered
    notes: list[str]  # misses a calibrated analysis is expected to make now and then

    @property
    def recovered(self) -> bool:
        return not self.problems

    @property
    def joint_coverage(self) -> float:
        """Bonferroni's guarantee: every interval covers the truth at once with at least this probability."""
        return max(0.0, 1.0 - sum(c.miss_rate for c in self.checks))


def check_recovery(document: dict[str, Any], truth: Truth) -> Recovery:
    """Did the analysis recover the known effects?

    Recovered means: no sample-ratio mismatch, and for each personalized arm the primary
    metric's interval covers the true lift and the lift is detected (significant, right sign).
    Every other interval is compared with the truth too; a miss there is reported as a note,
    since calibrated intervals miss with a known small probability (`joint_coverage`).
    """
    effects = true_effects(truth)
    problems: list[str] = []
    notes: list[str] = []
    checks: list[Check] = []
    if document.get("error"):
        problems.append(f"the analysis failed: {document['error']}")
    srm = document.get("srm") or {}
    srm_p = float(srm.get("p_value", float("nan")))
    srm_ok = bool(srm) and not srm.get("mismatch", True)
    if not srm_ok:
        problems.append(f"sample-ratio mismatch (p = {srm_p:.3g})")
    by_metric = {m["metric"]: m for m in document.get("metrics", [])}
    for (metric, arm), true_diff in effects.items():
        comparison = next((c for c in (by_metric.get(metric) or {}).get("comparisons", [])
                           if c.get("variant") == arm), None)
        if comparison is None:
            problems.append(f"no {metric} comparison for {arm}")
            continue
        lower, upper = float(comparison["ci_lower"]), float(comparison["ci_upper"])
        alpha = float(comparison.get("alpha", 0.05))
        miss_rate = alpha if comparison.get("alternative", "two-sided") == "two-sided" else 2 * alpha
        check = Check(metric, arm, true_diff, float(comparison["diff"]), lower, upper,
                      bool(comparison.get("significant")), lower <= true_diff <= upper, metric == PRIMARY, miss_rate)
        checks.append(check)
        outside = f"{metric}/{arm}: true effect {true_diff:+.4f} outside [{lower:+.4f}, {upper:+.4f}]"
        if check.primary:
            if not check.covered:
                problems.append(outside)
            if not (check.significant and check.diff * true_diff > 0):
                problems.append(f"{metric}/{arm}: true effect {true_diff:+.4f} not detected")
        elif not check.covered:
            notes.append(f"{outside} (this interval misses with probability {miss_rate:.1%})")
    return Recovery(checks, srm_ok, srm_p, problems, notes)


def format_recovery(recovery: Recovery, truth: Truth) -> str:
    """The truth-vs-estimate table the demo prints."""
    lines = ["Known effects vs the analysis (difference from static; Bonferroni-corrected intervals, all "
             f"covering the truth together with probability >= {recovery.joint_coverage:.0%}):",
             "  true conversion rates: " + ", ".join(f"{k} {v:.2%}" for k, v in truth.rates.items()),
             f"  {'metric':<11} {'arm':<7} {'true':>9} {'estimate':>9} {'interval':>22}  covered  significant"]
    for c in recovery.checks:
        lines.append(f"  {c.metric:<11} {c.arm:<7} {c.true_diff:>+9.4f} {c.diff:>+9.4f} "
                     f"[{c.ci_lower:>+9.4f}, {c.ci_upper:>+9.4f}]  {'yes' if c.covered else 'NO':<7}  "
                     f"{'yes' if c.significant else 'no'}")
    lines.append(f"  sample-ratio check: p = {recovery.srm_p:.3g} ({'ok' if recovery.srm_ok else 'MISMATCH'})")
    lines.extend(f"  note: {note}" for note in recovery.notes)
    return "\n".join(lines)
