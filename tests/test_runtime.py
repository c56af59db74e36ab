"""The shared server runtime, exercised with real servers on loopback ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.twofold.echo.v1 import echo_pb2, echo_pb2_grpc
from tests.tls_certs import issue, make_ca
from twofold import echo
from twofold.server import RunningServer, start_server
from twofold.settings import ServerSettings, TlsSettings
from twofold.testing import BackgroundLoop

ROOT = Path(__file__).resolve().parent.parent


def _start(bg_loop: BackgroundLoop, **overrides: object) -> RunningServer:
    settings = ServerSettings(**{"port": 0, "metrics_port": 0, **overrides})  # type: ignore[arg-type]
    return bg_loop.run(start_server(settings, [echo.registration()]))


def _metric(metrics_port: int, name: str, labels: dict[str, str]) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in body.splitlines():
        if line.startswith(name + "{"):
            series, value = line.rsplit(" ", 1)
            got = ",".join(sorted(series[len(name) + 1:-1].split(",")))
            if got == want:
                return float(value)
    return 0.0


def test_health_follows_readiness(bg_loop: BackgroundLoop) -> None:
    running = _start(bg_loop)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            assert stub.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
            assert stub.Check(health_pb2.HealthCheckRequest(service=echo.SERVICE_NAME)).status == \
                health_pb2.HealthCheckResponse.SERVING
            bg_loop.run(running.set_ready(False))
            assert stub.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        bg_loop.run(running.stop(0))


def test_reflection_lists_services(bg_loop: BackgroundLoop) -> None:
    running = _start(bg_loop)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            responses = list(stub.ServerReflectionInfo(iter([request])))
            names = {s.name for s in responses[0].list_services_response.service}
            assert {echo.SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
            # The descriptor itself is served too, so grpcurl can build requests.
            files = list(stub.ServerReflectionInfo(iter([
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=echo.SERVICE_NAME)])))
            assert files[0].file_descriptor_response.file_descriptor_proto
    finally:
        bg_loop.run(running.stop(0))


def test_metrics_count_calls_by_code(bg_loop: BackgroundLoop) -> None:
    running = _start(bg_loop)
    assert running.metrics_port
    labels = {"grpc_type": "unary", "grpc_service": echo.SERVICE_NAME, "grpc_method": "Echo"}
    health_labels = {"grpc_type": "unary", "grpc_service": "grpc.health.v1.Health", "grpc_method": "Check"}
    try:
        before_ok = _metric(running.metrics_port, "grpc_server_handled_total", {**labels, "grpc_code": "OK"})
        before_nf = _metric(running.metrics_port, "grpc_server_handled_total",
                            {**health_labels, "grpc_code": "NOT_FOUND"})
        before_started = _metric(running.metrics_port, "grpc_server_started_total", labels)
        with grpc.insecure_channel(running.target) as channel:
            stub = echo_pb2_grpc.EchoServiceStub(channel)
            for _ in range(3):
                assert stub.Echo(echo_pb2.EchoRequest(payload=b"x")).payload == b"x"
            with pytest.raises(grpc.RpcError):
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="missing"))
        assert _metric(running.metrics_port, "grpc_server_handled_total", {**labels, "grpc_code": "OK"}) == \
            before_ok + 3
        assert _metric(running.metrics_port, "grpc_server_started_total", labels) == before_started + 3
        assert _metric(running.metrics_port, "grpc_server_handled_total",
                       {**health_labels, "grpc_code": "NOT_FOUND"}) == before_nf + 1
        # The histogram starts at 50 µs, and its +Inf bucket counts every call.
        assert _metric(running.metrics_port, "grpc_server_handling_seconds_bucket", {**labels, "le": "+Inf"}) >= 3
        body = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=5).read().decode()
        assert 'grpc_server_handling_seconds_bucket{grpc_method="Echo",grpc_service="twofold.echo.v1.EchoService",' \
               'grpc_type="unary",le="5e-05"}' in body
    finally:
        bg_loop.run(running.stop(0))


def test_message_size_limit(bg_loop: BackgroundLoop) -> None:
    running = _start(bg_loop, max_message_bytes=1024)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = echo_pb2_grpc.EchoServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.Echo(echo_pb2.EchoRequest(payload=b"x" * 4096), timeout=5)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert stub.Echo(echo_pb2.EchoRequest(payload=b"ok"), timeout=5).payload == b"ok"
    finally:
        bg_loop.run(running.stop(0))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pki")
    ca_pem, ca_key, ca_cert = make_ca()
    server = issue(ca_key, ca_cert, "localhost", server=True)
    client = issue(ca_key, ca_cert, "twofold-client", server=False)
    _other_ca_pem, other_key, other_cert = make_ca("untrusted-ca")
    stranger = issue(other_key, other_cert, "stranger", server=False)
    files = {"ca": ca_pem.cert, "server_cert": server.cert, "server_key": server.key,
             "client_cert": client.cert, "client_key": client.key,
             "stranger_cert": stranger.cert, "stranger_key": stranger.key}
    paths = {}
    for name, data in files.items():
        paths[name] = folder / f"{name}.pem"
        paths[name].write_bytes(data)
    return paths


def _tls_echo(target: str, creds: grpc.ChannelCredentials) -> bytes:
    with grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", "localhost")]) as channel:
        return echo_pb2_grpc.EchoServiceStub(channel).Echo(echo_pb2.EchoRequest(payload=b"tls"), timeout=5).payload


def test_tls_handshake(bg_loop: BackgroundLoop, pki: dict[str, Path]) -> None:
    running = _start(bg_loop, tls=TlsSettings(pki["server_cert"], pki["server_key"]))
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
        assert _tls_echo(running.target, creds) == b"tls"
        # A plaintext client cannot talk to a TLS server.
        with grpc.insecure_channel(running.target) as channel, pytest.raises(grpc.RpcError) as err:
            echo_pb2_grpc.EchoServiceStub(channel).Echo(echo_pb2.EchoRequest(), timeout=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        bg_loop.run(running.stop(0))


def test_mutual_tls_requires_a_trusted_client_certificate(bg_loop: BackgroundLoop, pki: dict[str, Path]) -> None:
    running = _start(bg_loop, tls=TlsSettings(pki["server_cert"], pki["server_key"], pki["ca"]))
    try:
        ca = pki["ca"].read_bytes()
        good = grpc.ssl_channel_credentials(ca, pki["client_key"].read_bytes(), pki["client_cert"].read_bytes())
        assert _tls_echo(running.target, good) == b"tls"
        for creds in (
            grpc.ssl_channel_credentials(ca),  # no client certificate
            grpc.ssl_channel_credentials(ca, pki["stranger_key"].read_bytes(), pki["stranger_cert"].read_bytes()),
        ):
            with pytest.raises(grpc.RpcError) as err:
                _tls_echo(running.target, creds)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        bg_loop.run(running.stop(0))


def _spawn_echo(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], dict]:
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "twofold", "serve-echo", "--host", "127.0.0.1", "--port", "0",
         "--metrics-port", "0", "--ready-file", str(ready), *extra],
        cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"echo server did not start: {proc.communicate()[1].decode()[-2000:]}")
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())


def test_sigterm_drains_in_flight_calls_then_exits_zero(tmp_path: Path) -> None:
    proc, info = _spawn_echo(tmp_path, "--grace-seconds", "5")
    try:
        assert info["pid"] == proc.pid
        target = f"127.0.0.1:{info['port']}"
        with grpc.insecure_channel(target) as channel:
            stub = echo_pb2_grpc.EchoServiceStub(channel)
            assert stub.Echo(echo_pb2.EchoRequest(payload=b"warm"), timeout=5).payload == b"warm"
            in_flight = stub.Echo.future(echo_pb2.EchoRequest(payload=b"slow", delay_seconds=1.0), timeout=10)
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            assert in_flight.result().payload == b"slow"
        assert proc.wait(timeout=10) == 0
        logs = [json.loads(line) for line in proc.stderr.read().decode().splitlines() if line.startswith("{")]
        assert any(entry["msg"].startswith("shutdown requested") for entry in logs)
        # Once it is gone, nothing listens on that port any more.
        with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as err:
            echo_pb2_grpc.EchoServiceStub(channel).Echo(echo_pb2.EchoRequest(), timeout=1)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_settings_come_from_environment_and_flags_win(tmp_path: Path) -> None:
    proc, info = _spawn_echo(tmp_path, "--max-concurrent-rpcs", "1",
                             env={"TWOFOLD_MAX_CONCURRENT_RPCS": "50", "TWOFOLD_MAX_MESSAGE_BYTES": "2048"})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{info['port']}") as channel:
            stub = echo_pb2_grpc.EchoServiceStub(channel)
            # From the environment: messages over 2 KiB are refused.
            with pytest.raises(grpc.RpcError) as err:
                stub.Echo(echo_pb2.EchoRequest(payload=b"x" * 8192), timeout=5)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # From the flag (overriding the environment's 50): one call at a time.
            slow = stub.Echo.future(echo_pb2.EchoRequest(delay_seconds=1.0), timeout=10)
            time.sleep(0.3)
            with pytest.raises(grpc.RpcError) as err:
                stub.Echo(echo_pb2.EchoRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            slow.result()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


@pytest.mark.parametrize(("choice", "module"), [("auto", "uvloop"), ("asyncio", "asyncio.unix_events")])
def test_event_loop_choice_is_the_loop_that_serves(tmp_path: Path, choice: str, module: str) -> None:
    """uvloop by default (it is a dependency), the standard loop on request; both serve and drain."""
    proc, info = _spawn_echo(tmp_path, "--event-loop", choice)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{info['port']}") as channel:
            reply = echo_pb2_grpc.EchoServiceStub(channel).Echo(echo_pb2.EchoRequest(payload=b"hi"), timeout=5)
            assert reply.payload == b"hi"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    logs = [json.loads(line) for line in proc.stderr.read().decode().splitlines() if line.startswith("{")]
    started = next(entry for entry in logs if entry["msg"] == "grpc server started")
    assert started["event_loop"] == module


def test_bad_settings_are_refused_with_a_message(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "twofold", "serve-echo", "--port", "0", "--tls-cert", str(tmp_path / "c.pem")],
        cwd=ROOT, capture_output=True, timeout=30)
    assert result.returncode == 2
    assert b"--tls-cert and --tls-key must be given together" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "twofold", "serve-echo", "--port", "0"],
        cwd=ROOT, capture_output=True, timeout=30, env={**os.environ, "TWOFOLD_EVENT_LOOP": "tokio"})
    assert result.returncode == 2
    assert b"--event-loop: 'tokio' is not one of auto, uvloop, asyncio" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "twofold", "serve-echo", "--port", "0"],
        cwd=ROOT, capture_output=True, timeout=30, env={**os.environ, "TWOFOLD_LOG_LEVEL": "verbose"})
    assert result.returncode == 2
    assert b"--log-level: 'verbose' is not one of debug, info, warning, error" in result.stderr
    assert b"Traceback" not in result.stderr


def test_cli_lists_subcommands() -> None:
    result = subprocess.run([sys.executable, "-m", "twofold", "--help"], cwd=ROOT, capture_output=True, timeout=30)
    assert result.returncode == 0
    for name in ("serve-assignment", "serve-model", "serve-analysis", "analyze", "stats", "train", "demo"):
        assert name in result.stdout.decode()


def test_in_flight_call_survives_programmatic_stop(bg_loop: BackgroundLoop) -> None:
    running = _start(bg_loop)
    results: list[bytes] = []
    with grpc.insecure_channel(running.target) as channel:
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        worker = threading.Thread(target=lambda: results.append(
            stub.Echo(echo_pb2.EchoRequest(payload=b"z", delay_seconds=0.5), timeout=5).payload))
        worker.start()
        time.sleep(0.2)
        bg_loop.run(running.stop(3))
        worker.join()
    assert results == [b"z"]
