"""Alert rules and dashboard: only contract metric names, and a promtool test for every alert.

promtool itself runs in k8s/validate.sh (`promtool test rules`); here we check that the test
file leaves no alert untested and that nothing outside docs/metrics.md is queried.
"""

from __future__ import annotations

import pytest
import yaml

from tests.k8s_support import (
    K8S,
    OVERLAYS,
    alert_rules,
    dashboard,
    dashboard_queries,
    documented_metrics,
    family_of,
    metric_names,
    render,
    used_metric_names,
)

ALERT_TESTS = K8S / "tests" / "alerts.test.yaml"

# What issue 7 asks the alerts to cover, and the alert that does.
REQUIRED_ALERTS = {
    "error ratio": "TwofoldHighErrorRatio",
    "p99 latency": "TwofoldHighLatencyP99",
    "flag reload failures": "TwofoldFlagReloadFailing",
    "model load failures": "TwofoldModelLoadFailing",
    "exposure write lag": "TwofoldLakeWriteLag",
    "sample-ratio mismatch": "TwofoldSampleRatioMismatch",
    "analysis results stale": "TwofoldAnalysisStale",
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rules_and_dashboard_use_only_contract_metric_names(overlay: str) -> None:
    documented = documented_metrics()
    used = used_metric_names(render(overlay))
    unknown = {name: sorted(where) for name, where in used.items() if family_of(name, documented) is None}
    assert not unknown, f"metric names not in docs/metrics.md: {unknown}"
    # The dashboard shows every documented metric family at least once.
    shown = {family_of(n, documented) for n in used}
    assert set(documented) - shown == set(), "documented metrics missing from the dashboard and alerts"


def test_metric_names_are_read_from_nested_promql() -> None:
    # The parser, not a regex, finds the names: in binary operations, functions, subqueries.
    expr = ('sum(rate(a_total{x="b_total"}[5m])) / on (j) group_left max_over_time(c[1h:1m])'
            ' > bool scalar(d) unless absent(e{f="g"})')
    assert metric_names(expr) == {"a_total", "c", "d", "e"}
    board = {"panels": [{"targets": [{"expr": 'rate(x_total{namespace="$namespace"}[$__rate_interval])'}]}],
             "templating": {"list": [{"name": "ns", "type": "query",
                                      "query": {"query": "label_values(y_info, namespace)"}}]}}
    assert {n for q in dashboard_queries(board) for n in metric_names(q)} == {"x_total", "y_info"}


def test_every_required_alert_exists_with_severity_and_runbook() -> None:
    rules = {r["alert"]: r for r in alert_rules(render("prod"))}
    assert set(REQUIRED_ALERTS.values()) <= set(rules)
    readme = (K8S / "README.md").read_text()
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), name
        # The runbook points at a section of k8s/README.md that names the alert.
        path, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert path == "k8s/README.md" and f"## {anchor.capitalize()}" in readme
        assert f"`{name}`" in readme, f"{name} is not described in k8s/README.md"


def test_every_alert_has_a_firing_and_a_quiet_promtool_case() -> None:
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    assert tests["rule_files"] == ["rules.yaml"]
    firing: dict[str, int] = {}
    quiet: dict[str, int] = {}
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            target = firing if check.get("exp_alerts") else quiet
            target[check["alertname"]] = target.get(check["alertname"], 0) + 1
            for alert in check.get("exp_alerts") or []:
                # Expected annotations are spelled out, so the templates are tested too.
                assert set(alert["exp_annotations"]) == {"summary", "description", "runbook"}
    alerts = {r["alert"] for r in alert_rules(render("prod"))}
    assert alerts - set(firing) == set(), "alerts with no promtool case where they fire"
    assert alerts - set(quiet) == set(), "alerts with no promtool case where they stay quiet"
    assert set(firing) | set(quiet) <= alerts, "promtool cases for alerts that do not exist"


def test_overlays_carry_the_same_rules_and_dashboard() -> None:
    # Overlays may relabel them for their Prometheus, never fork their content.
    first, *others = OVERLAYS
    for overlay in others:
        assert alert_rules(render(overlay)) == alert_rules(render(first))
        assert dashboard(render(overlay)) == dashboard(render(first))

