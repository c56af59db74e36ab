"""Every metric name the dashboard and the alert rules use is really exported by a server.

Each server is started as Kubernetes starts it (`python -m twofold serve-...` with the
documented flags, on loopback port 0), receives real gRPC traffic, and its /metrics page is
scraped and parsed. The names come from the rendered PrometheusRule and dashboard of the dev
overlay, read with a PromQL parser, and each is checked on the server(s) that own it.

A server whose package is not on main yet fails here, naming the metric names that therefore
went unchecked: a missing server must never look like a passing deployment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.k8s_support import ROOT, documented_metrics, family_of, render, used_metric_names
from twofold.cli import load_command

SHARED_PREFIXES = ("grpc_server_",)
START_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class Server:
    """How to start one server for the test, send it traffic, and which metrics it owns."""

    command: str
    package: str
    # Metric-name prefixes this server must export (besides the shared gRPC ones).
    owns: tuple[str, ...]
    # Builds the server's own arguments in a scratch folder.
    arguments: Callable[[Path], list[str]]
    # Sends real calls on a channel to the server.
    traffic: Callable[[grpc.Channel], None]
    # The service its calls are counted under.
    grpc_service: str


def _assignment_args(tmp: Path) -> list[str]:
    flags = tmp / "flags"
    flags.mkdir()
    return ["--flags", str(flags), "--lake", str(tmp / "lake")]


def _assignment_traffic(channel: grpc.Channel) -> None:
    from protos.twofold.assignment.v1 import assignment_pb2 as pb
    from protos.twofold.assignment.v1 import assignment_pb2_grpc as pbg

    stub = pbg.FlagResolverServiceStub(channel)
    _call(stub.ResolveFlags, pb.ResolveFlagsRequest(client_secret="k8s-test", apply=True))
    _call(stub.TrackEvents, pb.TrackEventsRequest(
        client_secret="k8s-test", events=[pb.Event(event_id="k8s-test-1", unit="user-1", name="purchase", value=1.0)]))
    _call(stub.ApplyFlags, pb.ApplyFlagsRequest(client_secret="k8s-test", resolve_token=b"not-a-token"))


def _model_args(tmp: Path) -> list[str]:
    repository = tmp / "models"
    repository.mkdir()
    return ["--repository", str(repository), "--lake", str(tmp / "lake"), "--workers", "1"]


def _model_traffic(channel: grpc.Channel) -> None:
    from protos.twofold.model.v1 import model_pb2 as pb
    from protos.twofold.model.v1 import model_pb2_grpc as pbg

    stub = pbg.ModelServiceStub(channel)
    _call(stub.ListModels, pb.ListModelsRequest())
    _call(stub.Predict, pb.PredictRequest(model="no-such-model"))
    _call(stub.Decide, pb.DecideRequest(model="no-such-model"))


def _analysis_args(tmp: Path) -> list[str]:
    experiments = tmp / "experiments"
    experiments.mkdir()
    return ["--experiments", str(experiments), "--lake", str(tmp / "lake"), "--every", "15m"]


def _analysis_traffic(channel: grpc.Channel) -> None:
    from protos.twofold.analysis.v1 import analysis_pb2 as pb
    from protos.twofold.analysis.v1 import analysis_pb2_grpc as pbg

    stub = pbg.AnalysisServiceStub(channel)
    _call(stub.ListExperiments, pb.ListExperimentsRequest())
    _call(stub.GetResults, pb.GetResultsRequest(experiment="no-such-experiment"))


SERVERS = {
    "assignment": Server("serve-assignment", "assignment_server", ("twofold_assignment_", "twofold_lake_"),
                         _assignment_args, _assignment_traffic, "twofold.assignment.v1.FlagResolverService"),
    "model": Server("serve-model", "model_server", ("twofold_model_", "twofold_bandit_", "twofold_lake_"),
                    _model_args, _model_traffic, "twofold.model.v1.ModelService"),
    "analysis": Server("serve-analysis", "analysis_worker", ("twofold_analysis_",),
                       _analysis_args, _analysis_traffic, "twofold.analysis.v1.AnalysisService"),
}


def _call(method: Callable[..., object], request: object) -> None:
    """One real call; a refusal (bad secret, unknown model) is traffic too and is counted."""
    try:
        method(request, timeout=10)
    except grpc.RpcError as err:
        assert err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), err


def _names_for(server: Server) -> dict[str, set[str]]:
    """The used metric names (dev overlay) this server must export, with where they are used."""
    prefixes = SHARED_PREFIXES + server.owns
    used = used_metric_names(render("dev"))
    return {name: where for name, where in used.items() if name.startswith(prefixes)}


def test_every_used_metric_has_an_owning_server() -> None:
    owned = SHARED_PREFIXES + tuple(p for s in SERVERS.values() for p in s.owns)
    orphans = sorted(n for n in used_metric_names(render("dev")) if not n.startswith(owned))
    assert not orphans, f"no server is expected to export {orphans}: assign them an owner in this test"


def _exportable(page: str) -> set[str]:
    """Series names a scrape can return, from the families the page declares (even if empty)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(page):
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
        elif family.type == "summary":
            names.update(family.name + s for s in ("_sum", "_count"))
        else:
            names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def _start(server: Server, tmp_path: Path) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    ready = tmp_path / "ready.json"
    env = {**os.environ, "TWOFOLD_LOG_FORMAT": "json"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "twofold", server.command, *server.arguments(tmp_path),
         "--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", "0",
         "--grace-seconds", "1", "--ready-file", str(ready)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"twofold {server.command} did not start:\n{err.decode()[-3000:]}")
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("key", sorted(SERVERS))
def test_server_exports_every_metric_the_dashboard_and_alerts_use(key: str, tmp_path: Path) -> None:
    server = SERVERS[key]
    needed = _names_for(server)
    try:
        load_command(server.command)
    except SystemExit as exc:
        pytest.fail(f"{server.package} is not on main yet ({exc}); so these metric names used by the "
                    f"dashboard/alerts are NOT checked against a running server: {sorted(needed)}")

    proc, ports = _start(server, tmp_path)
    try:
        target = f"127.0.0.1:{ports['port']}"
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status in (
                health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)
            server.traffic(channel)
        page = urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics_port']}/metrics", timeout=10).read().decode()
    finally:
        _stop(proc)

    exported = _exportable(page)
    missing = {name: sorted(where) for name, where in needed.items() if name not in exported}
    assert not missing, f"twofold {server.command} does not export: {missing}"
    # The traffic really went through the instrumented server: its calls are counted.
    counted = [s for f in text_string_to_metric_families(page) if f.name == "grpc_server_handled"
               for s in f.samples if s.labels.get("grpc_service") == server.grpc_service]
    assert counted and sum(s.value for s in counted) >= 2, f"no calls of {server.grpc_service} counted"
    # Every exported twofold_* family is in the names contract (no undocumented drift).
    undocumented = sorted(f.name for f in text_string_to_metric_families(page)
                          if f.name.startswith("twofold_")
                          and family_of(f.name, documented_metrics()) is None
                          and family_of(f.name + "_total", documented_metrics()) is None)
    assert not undocumented, f"exported but not in docs/metrics.md: {undocumented}"


def test_the_check_itself_on_the_echo_server(tmp_path: Path) -> None:
    """The start / traffic / scrape / parse machinery, on the bare echo server that is on main:
    it finds the shared gRPC names and reports a server-specific name as missing."""
    from protos.twofold.echo.v1 import echo_pb2, echo_pb2_grpc

    def traffic(channel: grpc.Channel) -> None:
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        for _ in range(3):
            stub.Echo(echo_pb2.EchoRequest(payload=b"x"), timeout=10)

    echo = Server("serve-echo", "twofold", (), lambda _tmp: [], traffic, "twofold.echo.v1.EchoService")
    proc, ports = _start(echo, tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ports['port']}") as channel:
            echo.traffic(channel)
        page = urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics_port']}/metrics", timeout=10).read().decode()
    finally:
        _stop(proc)
    exported = _exportable(page)
    shared = {n for n in used_metric_names(render("dev")) if n.startswith(SHARED_PREFIXES)}
    assert shared and shared <= exported
    assert "twofold_assignment_reload_failures_total" not in exported
    (handled,) = [s for f in text_string_to_metric_families(page) if f.name == "grpc_server_handled"
                  for s in f.samples if s.labels["grpc_method"] == "Echo"]
    assert handled.value == 3 and handled.labels["grpc_code"] == "OK"
