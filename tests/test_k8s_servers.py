"""Every metric name the dashboard and the alert rules use is really exported by a server.

Each server is started the way its rendered prod Deployment starts it: the container's args
and environment (ConfigMaps, Secret references) as written, its volumes laid out in a scratch
folder (ConfigMap files written as the kubelet mounts them), only the bind addresses moved to
loopback port 0. It then receives real gRPC traffic, and its /metrics page is scraped and
parsed. The names come from the rendered PrometheusRule and dashboard, read with a PromQL
parser, and each is checked on the server(s) that own it: declared on the page, and with at
least one sample unless listed in `may_be_empty` with the reason.

A server whose package is not on main yet fails here, naming the metric names that therefore
went unchecked: a missing server must never look like a passing deployment.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.k8s_support import ROOT, Manifest, documented_metrics, family_of, one, render, used_metric_names, workload
from tests.redis_server import RedisServer
from tests.s3_server import S3Server
from twofold.cli import load_command
from twofold.lakestore import open_store

SHARED_PREFIXES = ("grpc_server_",)
START_TIMEOUT_S = 90.0
CLIENT_SECRET = "k8s-test-client-secret"
# What the test puts in the Secrets the Deployments reference (created outside git in a cluster).
TEST_SECRETS = {
    ("twofold-assignment", "token-key"): base64.b64encode(os.urandom(32)).decode(),
    ("twofold-assignment", "client-secret-backend"): CLIENT_SECRET,
    # twofold-redis/url: the real redis-server `prod_redis` starts; no password on loopback.
    ("twofold-redis", "password"): "",
    ("twofold-lake-credentials", "credentials"): "[default]\naws_access_key_id = test\naws_secret_access_key = test\n",
}


@pytest.fixture(scope="module", autouse=True)
def prod_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The prod overlay keeps sticky assignments in Redis: a real one for the deployed server."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    TEST_SECRETS[("twofold-redis", "url")] = server.url
    try:
        yield
    finally:
        server.kill()


@pytest.fixture(autouse=True)
def prod_lake_on_the_test_s3(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prod overlay's lake is on S3: here a fresh bucket of the test S3 server on loopback,
    which `as_deployed` puts in place of the overlay's bucket (as it moves bind addresses)."""
    monkeypatch.setenv("TEST_PROD_LAKE", f"s3://{s3_env.new_bucket()}/prod")
    monkeypatch.setenv("TEST_S3_ENDPOINT", s3_env.endpoint)


@dataclass(frozen=True)
class Server:
    """One Deployment: how to feed it, what traffic to send, which metrics it owns."""

    deployment: str
    package: str
    # Metric-name prefixes this server must export (besides the shared gRPC ones).
    owns: tuple[str, ...]
    # Sends real calls; returns once they are answered.
    traffic: Callable[[grpc.Channel], None]
    grpc_service: str
    # Fills the server's volumes before start (mount path -> local folder).
    prepare: Callable[[dict[str, Path]], None] = lambda _mounts: None
    # Used names that may have no sample after the traffic, each with the reason.
    may_be_empty: dict[str, str] = field(default_factory=dict)
    # Waits until the server has done its first background work (e.g. a computation).
    settle: Callable[[Callable[[], str]], None] = lambda _scrape: None


def _call(method: Callable[..., Any], request: object) -> Any:
    """One real call; a refusal (unknown model) is traffic too and is counted."""
    try:
        return method(request, timeout=10)
    except grpc.RpcError as err:
        assert err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                  grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INTERNAL), err
        return None


# ---- assignment server --------------------------------------------------------------------------
def _assignment_traffic(channel: grpc.Channel) -> None:
    from protos.twofold.assignment.v1 import assignment_pb2 as pb
    from protos.twofold.assignment.v1 import assignment_pb2_grpc as pbg

    stub = pbg.FlagResolverServiceStub(channel)
    # The deployed example flag, resolved with the client secret from the deployed Secret.
    for unit, apply in (("user-1", True), ("user-2", False)):
        request = pb.ResolveFlagsRequest(flags=["flags/welcome-banner"], client_secret=CLIENT_SECRET, apply=apply)
        request.evaluation_context.update({"targeting_key": unit})
        response = stub.ResolveFlags(request, timeout=10)
        (resolved,) = response.resolved_flags
        assert resolved.variant.rsplit("/", 1)[-1] in {"hidden", "shown"}, resolved
    applied = pb.ApplyFlagsRequest(client_secret=CLIENT_SECRET, resolve_token=response.resolve_token,
                                   flags=[pb.AppliedFlag(flag="flags/welcome-banner")])
    applied.send_time.GetCurrentTime()
    applied.flags[0].apply_time.GetCurrentTime()
    stub.ApplyFlags(applied, timeout=10)
    track = pb.TrackEventsRequest(client_secret=CLIENT_SECRET, events=[
        pb.Event(event_id="k8s-test-1", unit="user-1", name="click", value=1.0)])
    track.send_time.GetCurrentTime()
    track.events[0].time.GetCurrentTime()
    assert stub.TrackEvents(track, timeout=10).accepted == 1


# ---- model server -------------------------------------------------------------------------------
BANDIT = "home-linucb"


def _model_repository(mounts: dict[str, Path]) -> None:
    """Publish an untrained bandit with the documented CLI, plus a broken newer version."""
    repository = mounts["/var/lib/twofold/models"]
    subprocess.run([sys.executable, "-m", "twofold", "train", "bandit", "--init", "--model", BANDIT,
                    "--repository", str(repository), "--arms", "a,b,c", "--features", "x0,x1"],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    good, broken = repository / BANDIT / "1", repository / BANDIT / "2"
    broken.mkdir()
    for path in good.iterdir():
        # Same manifest, unreadable model file: the server must refuse version 2 and count it.
        (broken / path.name).write_bytes(path.read_bytes() if path.suffix == ".json" else b"not an onnx graph")


def _model_traffic(channel: grpc.Channel) -> None:
    from protos.twofold.model.v1 import model_pb2 as pb
    from protos.twofold.model.v1 import model_pb2_grpc as pbg

    stub = pbg.ModelServiceStub(channel)
    deadline = time.monotonic() + 30
    while BANDIT not in str(_call(stub.ListModels, pb.ListModelsRequest())):
        assert time.monotonic() < deadline, f"{BANDIT} was never loaded"
        time.sleep(0.2)
    for i in range(5):
        response = stub.Decide(pb.DecideRequest(model=BANDIT, unit=f"user-{i}",
                                                named=pb.NamedFeatures(values={"x0": 1.0, "x1": 0.5})), timeout=10)
        assert response.arm in {"a", "b", "c"}
    _call(stub.Predict, pb.PredictRequest(model="no-such-model"))


# ---- analysis worker ----------------------------------------------------------------------------
def _analysis_traffic(channel: grpc.Channel) -> None:
    from protos.twofold.analysis.v1 import analysis_pb2 as pb
    from protos.twofold.analysis.v1 import analysis_pb2_grpc as pbg

    stub = pbg.AnalysisServiceStub(channel)
    assert "welcome-banner" in str(stub.ListExperiments(pb.ListExperimentsRequest(), timeout=10))
    # Results exist once the first computation (started with the worker) is done; until then
    # the worker says UNAVAILABLE, "retry shortly", as a client would be told.
    deadline = time.monotonic() + 60
    while True:
        try:
            response = stub.GetResults(pb.GetResultsRequest(experiment="welcome-banner"), timeout=10)
            break
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            assert time.monotonic() < deadline, f"no results within 60 s: {err.details()}"
        time.sleep(0.5)
    # End to end through the deployment: every unit the assignment server exposed is counted.
    document = json.loads(response.results_json)
    assert not document.get("error"), f"the deployed analysis of the deployed flag failed: {document['error']}"
    assert sum(document["units"].values()) == EXPERIMENT_UNITS, document["units"]


def _lake_compacted(*tables: str) -> Callable[[Callable[[], str]], None]:
    """Wait until the records the traffic wrote reached Parquet (compaction runs every few s)."""

    def settle(scrape: Callable[[], str]) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            published = {s.labels.get("table") for f in text_string_to_metric_families(scrape())
                         for s in f.samples if s.name == "twofold_lake_parquet_files_total" and s.value > 0}
            if set(tables) <= published:
                return
            time.sleep(0.5)
        pytest.fail(f"no Parquet file published for {tables} within 60 s")

    return settle


EXPERIMENT_UNITS = 400


def _lake_from_the_assignment_server(mounts: dict[str, Path]) -> None:
    """Fill the analysis worker's lake the way production does: the deployed assignment server
    (same volume) logs exposures of the example flag and click events, then drains to Parquet."""
    from protos.twofold.assignment.v1 import assignment_pb2 as pb
    from protos.twofold.assignment.v1 import assignment_pb2_grpc as pbg

    scratch = mounts["/tmp"].parent.parent / "assignment-pod"
    deployed = as_deployed(render("prod"), "assignment-server", scratch)
    proc, ports = _start(deployed, scratch)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ports['port']}") as channel:
            stub = pbg.FlagResolverServiceStub(channel)
            events = []
            for i in range(EXPERIMENT_UNITS):
                request = pb.ResolveFlagsRequest(flags=["flags/welcome-banner"], client_secret=CLIENT_SECRET,
                                                 apply=True)
                request.evaluation_context.update({"targeting_key": f"user-{i}"})
                stub.ResolveFlags(request, timeout=10)
                if i % 3 == 0:
                    event = pb.Event(event_id=f"click-{i}", unit=f"user-{i}", name="click")
                    event.time.GetCurrentTime()
                    events.append(event)
            track = pb.TrackEventsRequest(client_secret=CLIENT_SECRET, events=events)
            track.send_time.GetCurrentTime()
            assert stub.TrackEvents(track, timeout=10).accepted == len(events)
    finally:
        _stop(proc)
    assert proc.returncode == 0
    store = open_store(deployed.env["TWOFOLD_LAKE"])
    assert store.list_files("exposures/") and store.list_files("events/")


def _first_computation(scrape: Callable[[], str]) -> None:
    """The worker computes every experiment at start; wait until that run is accounted for."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        samples = {s.name for f in text_string_to_metric_families(scrape()) for s in f.samples}
        if {"twofold_analysis_last_success_timestamp_seconds", "twofold_analysis_failures_total"} & samples:
            return
        time.sleep(0.5)
    pytest.fail("the analysis worker finished no computation within 60 s")


NOT_WITHOUT_FAILURE = "counts failures only; the test produces none"
SERVERS = {
    "assignment": Server(
        "assignment-server", "assignment_server", ("twofold_assignment_", "twofold_lake_"),
        _assignment_traffic, "twofold.assignment.v1.FlagResolverService",
        settle=_lake_compacted("exposures", "events"),
        may_be_empty={"twofold_lake_write_failures_total": NOT_WITHOUT_FAILURE}),
    "model": Server(
        "model-server", "model_server", ("twofold_model_", "twofold_bandit_", "twofold_lake_"),
        _model_traffic, "twofold.model.v1.ModelService", prepare=_model_repository,
        settle=_lake_compacted("decisions"),
        may_be_empty={"twofold_lake_write_failures_total": NOT_WITHOUT_FAILURE}),
    "analysis": Server(
        "analysis-worker", "analysis_worker", ("twofold_analysis_",),
        _analysis_traffic, "twofold.analysis.v1.AnalysisService", prepare=_lake_from_the_assignment_server,
        settle=_first_computation,
        may_be_empty={"twofold_analysis_failures_total": NOT_WITHOUT_FAILURE}),
}


# ---- running a Deployment's container locally ---------------------------------------------------
@dataclass
class Deployed:
    args: list[str]
    env: dict[str, str]
    mounts: dict[str, Path]


def _secret(name: str, key: str) -> str:
    value = TEST_SECRETS.get((name, key))
    assert value is not None, f"the Deployment needs Secret {name}/{key}: add a test value to TEST_SECRETS"
    return value


def project_volume(folder: Path, files: dict[str, str]) -> None:
    """Write a ConfigMap or Secret volume the way the kubelet does, and update it the same way.

    The files live in a hidden timestamped folder; `..data` links to it and each key is a link
    through `..data`. An update writes a new folder and swaps `..data` with one rename, so a
    reader sees the old set of files or the new one, and no file's own mtime changes.
    """
    stamp = folder / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.time_ns()}"
    stamp.mkdir()
    for key, text in files.items():
        (stamp / key).write_text(text)
    data = folder / "..data"
    old = data.resolve() if data.is_symlink() else None
    link = folder / "..data_tmp"
    link.symlink_to(stamp.name)
    os.replace(link, data)
    for entry in folder.iterdir():
        if entry.is_symlink() and not entry.name.startswith("..") and entry.name not in files:
            entry.unlink()
    for key in files:
        if not (folder / key).is_symlink():
            (folder / key).symlink_to(f"..data/{key}")
    if old is not None:
        for path in old.iterdir():
            path.unlink()
        old.rmdir()


def as_deployed(docs: list[Manifest], name: str, scratch: Path, shared: dict[str, Path] | None = None) -> Deployed:
    """The container of Deployment `name`: its volumes under `scratch` (or, for mount paths in
    `shared`, those folders: two servers on one volume), args and env remapped."""
    deployment = workload(docs, name)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts: dict[str, Path] = {}
    for mount in container["volumeMounts"]:
        if shared and mount["mountPath"] in shared:
            mounts[mount["mountPath"]] = shared[mount["mountPath"]]
            continue
        local = scratch / mount["name"]
        local.mkdir(parents=True)
        volume = volumes.get(mount["name"], {})  # absent: the pod's own claim (volumeClaimTemplates)
        if "configMap" in volume:
            project_volume(local, one(docs, "ConfigMap", volume["configMap"]["name"])["data"])
        elif "secret" in volume:
            project_volume(local, {item["path"]: _secret(volume["secret"]["secretName"], item["key"])
                                   for item in volume["secret"]["items"]})
        mounts[mount["mountPath"]] = local

    def local_path(value: str) -> str:
        for mount_path in sorted(mounts, key=len, reverse=True):
            if value == mount_path or value.startswith(mount_path + "/"):
                return str(mounts[mount_path]) + value[len(mount_path):]
        return value

    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            secret = source["secretRef"]["name"]
            keys = [key for (owner, key) in TEST_SECRETS if owner == secret]
            assert keys, f"the Deployment needs Secret {secret}: add test values to TEST_SECRETS"
            env.update({key: _secret(secret, key) for key in keys})
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = local_path(entry["value"])
        elif "fieldRef" in entry["valueFrom"]:
            assert entry["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
            env[entry["name"]] = f"{name}-0"  # a StatefulSet's first pod
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = _secret(ref["name"], ref["key"])
    if env.get("TWOFOLD_LAKE", "").startswith("s3://"):
        env["TWOFOLD_LAKE"] = os.environ["TEST_PROD_LAKE"]
        env["AWS_ENDPOINT_URL"] = os.environ["TEST_S3_ENDPOINT"]
        env["AWS_EC2_METADATA_DISABLED"] = "true"
    return Deployed([local_path(a) for a in container["args"]], env, mounts)


def _start(deployed: Deployed, scratch: Path) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    ready = scratch / "ready.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWOFOLD_")}
    env.update(deployed.env)
    # Flags win over the environment (and over earlier flags): only the addresses move.
    overrides = ["--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", "0",
                 "--grace-seconds", "1", "--ready-file", str(ready)]
    proc = subprocess.Popen([sys.executable, "-m", "twofold", *deployed.args, *overrides],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"twofold {deployed.args[0]} did not start:\n{err.decode()[-3000:]}")
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


def _sampled(page: str) -> set[str]:
    return {s.name for f in text_string_to_metric_families(page) for s in f.samples}


def _names_for(server: Server) -> dict[str, set[str]]:
    """The used metric names this server must export, with where they are used."""
    prefixes = SHARED_PREFIXES + server.owns
    return {n: where for n, where in used_metric_names(render("prod")).items() if n.startswith(prefixes)}


# ---- tests --------------------------------------------------------------------------------------
def test_every_used_metric_has_an_owning_server() -> None:
    owned = SHARED_PREFIXES + tuple(p for s in SERVERS.values() for p in s.owns)
    orphans = sorted(n for n in used_metric_names(render("prod")) if not n.startswith(owned))
    assert not orphans, f"no server is expected to export {orphans}: assign them an owner in this test"


@pytest.mark.parametrize("key", sorted(SERVERS))
def test_deployed_command_parses_with_the_real_command_line(key: str, tmp_path: Path) -> None:
    """The Deployment's args and TWOFOLD_* environment are accepted by the subcommand."""
    server = SERVERS[key]
    deployed = as_deployed(render("prod"), server.deployment, tmp_path)
    try:
        command = load_command(deployed.args[0])
    except SystemExit as exc:
        pytest.fail(f"{server.package} is not on main yet ({exc}): Deployment {server.deployment} "
                    f"runs {deployed.args[0]} {deployed.args[1:]}, which cannot be checked")
    parser = argparse.ArgumentParser(prog=f"twofold {deployed.args[0]}")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in deployed.env.items():
            patch.setenv(name, value)
        command.configure(parser)
        parsed = parser.parse_args(deployed.args[1:])
    # The ports the probes, Service and ServiceMonitor use are the ones the server binds.
    assert (parsed.port, parsed.metrics_port) == (int(deployed.args[deployed.args.index("--port") + 1]),
                                                  int(deployed.env["TWOFOLD_METRICS_PORT"]))


@pytest.mark.parametrize("key", sorted(SERVERS))
def test_server_exports_every_metric_the_dashboard_and_alerts_use(key: str, tmp_path: Path) -> None:
    server = SERVERS[key]
    needed = _names_for(server)
    deployed = as_deployed(render("prod"), server.deployment, tmp_path / "pod")
    try:
        load_command(deployed.args[0])
    except SystemExit as exc:
        pytest.fail(f"{server.package} is not on main yet ({exc}); so these metric names used by the "
                    f"dashboard/alerts are NOT checked against a running server: {sorted(needed)}")
    server.prepare(deployed.mounts)
    proc, ports = _start(deployed, tmp_path)

    def scrape() -> str:
        url = f"http://127.0.0.1:{ports['metrics_port']}/metrics"
        return urllib.request.urlopen(url, timeout=10).read().decode()

    try:
        with grpc.insecure_channel(f"127.0.0.1:{ports['port']}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
            server.traffic(channel)
        server.settle(scrape)
        page = scrape()
    finally:
        _stop(proc)

    # prometheus_client's multiprocess mode (the model server's --workers > 1) shows only
    # families with samples: there a `may_be_empty` name may be absent from the page altogether
    # (the single-process assignment server still proves the shared lake writer declares it).
    workers = int(deployed.args[deployed.args.index("--workers") + 1]) if "--workers" in deployed.args else 1
    excused = set(server.may_be_empty) if workers > 1 else set()
    missing = {name: sorted(where) for name, where in needed.items()
               if name not in _exportable(page) and name not in excused}
    assert not missing, f"twofold {deployed.args[0]} does not export: {missing}"
    empty = sorted(set(needed) - _sampled(page) - set(server.may_be_empty))
    assert not empty, f"declared but no sample after real traffic: {empty}"
    # The traffic really went through the instrumented server: its calls are counted.
    counted = [s for f in text_string_to_metric_families(page) if f.name == "grpc_server_handled"
               for s in f.samples if s.labels.get("grpc_service") == server.grpc_service]
    assert counted and sum(s.value for s in counted) >= 2, f"no calls of {server.grpc_service} counted"
    # Every exported twofold_* family is in the names contract (no undocumented drift);
    # `<counter>_created` is prometheus_client's creation timestamp of a documented counter.
    documented = documented_metrics()
    undocumented = sorted(
        f.name for f in text_string_to_metric_families(page)
        if f.name.startswith("twofold_")
        and family_of(f.name, documented) is None and family_of(f.name + "_total", documented) is None
        and not (f.name.endswith("_created") and f.name.removesuffix("_created") + "_total" in documented))
    assert not undocumented, f"exported but not in docs/metrics.md: {undocumented}"


def test_the_check_itself_on_the_echo_server(tmp_path: Path) -> None:
    """The start / scrape / parse machinery, on the bare echo server that is on main: it finds
    the shared gRPC names and reports a server-specific name as missing."""
    from protos.twofold.echo.v1 import echo_pb2, echo_pb2_grpc

    proc, ports = _start(Deployed(["serve-echo"], {}, {}), tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ports['port']}") as channel:
            stub = echo_pb2_grpc.EchoServiceStub(channel)
            for _ in range(3):
                stub.Echo(echo_pb2.EchoRequest(payload=b"x"), timeout=10)
        page = urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics_port']}/metrics", timeout=10).read().decode()
    finally:
        _stop(proc)
    exported = _exportable(page)
    shared = {n for n in used_metric_names(render("prod")) if n.startswith(SHARED_PREFIXES)}
    assert shared and shared <= exported
    assert "twofold_assignment_reload_failures_total" not in exported
    (handled,) = [s for f in text_string_to_metric_families(page) if f.name == "grpc_server_handled"
                  for s in f.samples if s.labels["grpc_method"] == "Echo"]
    assert handled.value == 3 and handled.labels["grpc_code"] == "OK"


def test_deployment_is_laid_out_locally_as_the_kubelet_mounts_it(tmp_path: Path) -> None:
    deployed = as_deployed(render("prod"), "assignment-server", tmp_path)
    flags = deployed.mounts["/etc/twofold/flags"]
    visible = {p.name for p in flags.iterdir() if not p.name.startswith("..")}
    assert visible == {"clients.yaml", "example.yaml", "allocations.lock.json"}
    assert all((flags / name).is_symlink() and (flags / name).resolve().parent == (flags / "..data").resolve()
               for name in visible)
    assert deployed.args[deployed.args.index("--flags") + 1] == str(flags)
    token_file = Path(deployed.env["TWOFOLD_TOKEN_KEY_FILE"])
    assert len(base64.b64decode(token_file.read_text())) == 32
    assert deployed.env["TWOFOLD_CLIENT_SECRET_BACKEND"] == CLIENT_SECRET


def _sample(page: str, name: str) -> float:
    values = [s.value for f in text_string_to_metric_families(page) for s in f.samples if s.name == name]
    assert len(values) == 1, (name, values)
    return values[0]


def test_flag_changes_reach_the_running_server_through_the_configmap_mount(tmp_path: Path) -> None:
    """The flags ConfigMap is mounted as a directory (no subPath): when it changes, the kubelet
    swaps `..data`, and the running assignment server serves the new flags without a restart,
    or refuses a broken change and keeps serving the last good state."""
    docs = render("prod")
    deployed = as_deployed(docs, "assignment-server", tmp_path / "pod")
    try:
        load_command(deployed.args[0])
    except SystemExit as exc:
        pytest.fail(f"assignment_server is not on main yet ({exc}): flag reload through the ConfigMap "
                    "mount is NOT checked")
    from protos.twofold.assignment.v1 import assignment_pb2 as pb
    from protos.twofold.assignment.v1 import assignment_pb2_grpc as pbg

    flags_dir = deployed.mounts["/etc/twofold/flags"]
    configmap = dict(one(docs, "ConfigMap", "twofold-flags")["data"])
    probe = ("flag: k8s-reload-probe\nvariants:\n  only: {system: static}\ndefault: only\nrules: []\n")
    proc, ports = _start(deployed, tmp_path)

    def scrape() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics_port']}/metrics", timeout=10).read().decode()

    def resolve(stub: pbg.FlagResolverServiceStub, flag: str) -> str:
        request = pb.ResolveFlagsRequest(flags=[f"flags/{flag}"], client_secret=CLIENT_SECRET)
        request.evaluation_context.update({"targeting_key": "user-1"})
        (resolved,) = stub.ResolveFlags(request, timeout=10).resolved_flags
        return resolved.variant

    def wait_for(condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 20
        while not condition():
            assert time.monotonic() < deadline, f"not within 20 s: {what}"
            time.sleep(0.2)

    try:
        with grpc.insecure_channel(f"127.0.0.1:{ports['port']}") as channel:
            stub = pbg.FlagResolverServiceStub(channel)
            assert resolve(stub, "welcome-banner")
            generation = _sample(scrape(), "twofold_assignment_state_generation")

            project_volume(flags_dir, {**configmap, "probe.yaml": probe})
            wait_for(lambda: _sample(scrape(), "twofold_assignment_state_generation") > generation,
                     "the new ConfigMap content is served")
            assert resolve(stub, "k8s-reload-probe").endswith("/only")

            project_volume(flags_dir, {**configmap, "probe.yaml": probe, "broken.yaml": "flag: [unclosed\n"})
            wait_for(lambda: _sample(scrape(), "twofold_assignment_reload_failures_total") >= 1,
                     "the broken change is refused and counted")
            # The last good state keeps serving, with both flags.
            assert resolve(stub, "k8s-reload-probe").endswith("/only")
            assert resolve(stub, "welcome-banner")
    finally:
        _stop(proc)
    assert proc.returncode == 0
