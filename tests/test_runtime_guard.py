"""What every call goes through (twofold.guard) and the runtime's production switches, on real servers.

Overload leaves health and reflection alone, undecodable bytes are INVALID_ARGUMENT on every
service, client secrets in metadata, certificate rotation without restart, reflection off, the
metrics port next to the chosen port, and a port in use refused in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
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
HEALTH = "/grpc.health.v1.Health/Check"
SECRET_METADATA_KEY = "x-twofold-client-secret"  # the documented metadata key (twofold.guard)
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


def _start(bg_loop: BackgroundLoop, **overrides: object) -> RunningServer:
    settings = ServerSettings(**{"port": 0, "metrics_port": 0, **overrides})  # type: ignore[arg-type]
    return bg_loop.run(start_server(settings, [echo.registration()]))


def _raw(channel: grpc.Channel, method: str, *, stream: bool = False) -> grpc.UnaryUnaryMultiCallable:
    identity = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    return channel.stream_stream(method, **identity) if stream else channel.unary_unary(method, **identity)


def _list_services(channel: grpc.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                             timeout=5))
    return {s.name for s in replies[0].list_services_response.service}


def test_health_and_reflection_answer_while_the_limit_is_reached(bg_loop: BackgroundLoop) -> None:
    running = _start(bg_loop, max_concurrent_rpcs=2)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = echo_pb2_grpc.EchoServiceStub(channel)
            slow = [stub.Echo.future(echo_pb2.EchoRequest(payload=b"s", delay_seconds=1.5)) for _ in range(2)]
            time.sleep(0.3)
            with pytest.raises(grpc.RpcError) as err:
                stub.Echo(echo_pb2.EchoRequest(payload=b"x"), timeout=5)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # Probes and tooling are never limited: a busy pod must not be restarted as dead.
            for _ in range(5):
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert echo.SERVICE_NAME in _list_services(channel)
            assert [f.result(timeout=10).payload for f in slow] == [b"s", b"s"]
            # Capacity frees up once the slow calls finish.
            assert stub.Echo(echo_pb2.EchoRequest(payload=b"y"), timeout=5).payload == b"y"
    finally:
        bg_loop.run(running.stop(0))


def test_refusals_are_counted_in_the_standard_metrics(bg_loop: BackgroundLoop) -> None:
    running = _start(bg_loop, max_concurrent_rpcs=1)
    series = ('grpc_server_handled_total{grpc_code="RESOURCE_EXHAUSTED",grpc_method="Echo",'
              'grpc_service="twofold.echo.v1.EchoService",grpc_type="unary"} ')

    def refused() -> float:
        return sum(float(line[len(series):]) for line in _scrape(running).splitlines() if line.startswith(series))

    try:
        before = refused()
        with grpc.insecure_channel(running.target) as channel:
            stub = echo_pb2_grpc.EchoServiceStub(channel)
            slow = stub.Echo.future(echo_pb2.EchoRequest(delay_seconds=1.0))
            time.sleep(0.3)
            for _ in range(3):
                with pytest.raises(grpc.RpcError):
                    stub.Echo(echo_pb2.EchoRequest(), timeout=5)
            slow.result(timeout=10)
        assert refused() == before + 3  # gRPC's own limiter refused without a trace in the metrics
    finally:
        bg_loop.run(running.stop(0))


def _scrape(running: RunningServer) -> str:
    import urllib.request

    return urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=5).read().decode()


@pytest.mark.parametrize("method", ["/twofold.echo.v1.EchoService/Echo", HEALTH, REFLECTION])
def test_undecodable_bytes_are_invalid_argument_on_every_service(bg_loop: BackgroundLoop, method: str) -> None:
    running = _start(bg_loop)
    garbage = b"\xff\xff\xff\xff not a protobuf"
    try:
        with grpc.insecure_channel(running.target) as channel:
            with pytest.raises(grpc.RpcError) as err:
                if method == REFLECTION:
                    list(_raw(channel, method, stream=True)(iter([garbage]), timeout=5))
                else:
                    _raw(channel, method)(garbage, timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "is not a valid" in (err.value.details() or "")
            # ... and the server keeps serving.
            assert echo_pb2_grpc.EchoServiceStub(channel).Echo(echo_pb2.EchoRequest(payload=b"ok"),
                                                               timeout=5).payload == b"ok"
    finally:
        bg_loop.run(running.stop(0))


def test_a_call_whose_deadline_passed_while_queued_does_not_run(bg_loop: BackgroundLoop) -> None:
    """Calls wait in gRPC core while the loop is busy; once dispatched past their deadline, no work."""
    runs: list[bytes] = []

    class Counting(echo.EchoServicer):
        async def Echo(self, request: echo_pb2.EchoRequest, context: grpc.aio.ServicerContext) -> echo_pb2.EchoResponse:
            runs.append(request.payload)
            if request.payload == b"block":
                time.sleep(0.6)  # noqa: ASYNC251 - holds the loop, as a CPU-heavy handler would
            return echo_pb2.EchoResponse(payload=request.payload)

    registration = echo.ServiceRegistration(echo.SERVICE_NAME, Counting(),
                                            echo_pb2_grpc.add_EchoServiceServicer_to_server)
    running = bg_loop.run(start_server(ServerSettings(port=0, metrics_port=None), [registration]))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = echo_pb2_grpc.EchoServiceStub(channel)
            blocker = stub.Echo.future(echo_pb2.EchoRequest(payload=b"block"), timeout=10)
            time.sleep(0.15)
            late = [stub.Echo.future(echo_pb2.EchoRequest(payload=b"late"), timeout=0.2) for _ in range(5)]
            codes = []
            for f in late:
                try:
                    f.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
            assert blocker.result().payload == b"block"
            assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 5
            time.sleep(0.2)
        assert runs == [b"block"]  # none of the expired calls reached the handler
    finally:
        bg_loop.run(running.stop(0))


def test_client_secrets_in_metadata_are_required_and_reloaded(bg_loop: BackgroundLoop, tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.write_text("# one per line\nfirst-secret\n")
    running = _start(bg_loop, client_secrets_file=secrets)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = echo_pb2_grpc.EchoServiceStub(channel)
            for metadata in ((), ((SECRET_METADATA_KEY, "wrong"),)):
                with pytest.raises(grpc.RpcError) as err:
                    stub.Echo(echo_pb2.EchoRequest(payload=b"x"), metadata=metadata, timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = stub.Echo(echo_pb2.EchoRequest(payload=b"x"), metadata=((SECRET_METADATA_KEY, "first-secret"),),
                           timeout=5)
            assert ok.payload == b"x"
            # Probes and reflection need no secret.
            assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
            assert echo.SERVICE_NAME in _list_services(channel)
            # Rotation: a new file replaces the secrets within about a second, without a restart.
            replacement = tmp_path / "secrets.new"
            replacement.write_text("second-secret\n")
            os.replace(replacement, secrets)
            deadline = time.monotonic() + 10
            while True:
                try:
                    stub.Echo(echo_pb2.EchoRequest(), metadata=((SECRET_METADATA_KEY, "second-secret"),), timeout=5)
                    break
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAUTHENTICATED and time.monotonic() < deadline
                    time.sleep(0.2)
            with pytest.raises(grpc.RpcError) as err:
                stub.Echo(echo_pb2.EchoRequest(), metadata=((SECRET_METADATA_KEY, "first-secret"),), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        bg_loop.run(running.stop(0))


def test_reflection_can_be_turned_off(bg_loop: BackgroundLoop) -> None:
    running = _start(bg_loop, reflection=False)
    try:
        with grpc.insecure_channel(running.target) as channel, pytest.raises(grpc.RpcError) as err:
            _list_services(channel)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        bg_loop.run(running.stop(0))


def _write_pki(folder: Path, ca_name: str) -> tuple[Path, Path, bytes]:
    """A fresh CA and a server certificate for localhost it signed: (cert file, key file, CA PEM)."""
    ca_pem, ca_key, ca_cert = make_ca(ca_name)
    server = issue(ca_key, ca_cert, "localhost", server=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tls.crt").write_bytes(server.cert)
    (folder / "tls.key").write_bytes(server.key)
    return folder / "tls.crt", folder / "tls.key", ca_pem.cert


def _handshake(target: str, ca: bytes) -> bool:
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    with grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", "localhost")]) as channel:
        try:
            echo_pb2_grpc.EchoServiceStub(channel).Echo(echo_pb2.EchoRequest(payload=b"t"), timeout=3)
            return True
        except grpc.RpcError:
            return False


def test_rotated_certificate_files_are_used_by_new_connections(bg_loop: BackgroundLoop, tmp_path: Path) -> None:
    live = tmp_path / "live"
    cert, key, old_ca = _write_pki(live, "old-ca")
    running = _start(bg_loop, tls=TlsSettings(cert, key))
    try:
        assert _handshake(running.target, old_ca)
        # cert-manager style: new files swapped in (key and certificate from a new CA).
        _new_cert, _new_key, new_ca = _write_pki(tmp_path / "next", "new-ca")
        staged = tmp_path / "staged"
        shutil.copytree(tmp_path / "next", staged)
        os.replace(staged / "tls.key", key)
        os.replace(staged / "tls.crt", cert)
        deadline = time.monotonic() + 15
        while not _handshake(running.target, new_ca):
            assert time.monotonic() < deadline, "the rotated certificate was never served"
            time.sleep(0.3)
        assert not _handshake(running.target, old_ca)
        # A half-done rotation (a key that does not match the certificate) keeps the last good pair.
        _, other_key, _ = _write_pki(tmp_path / "other", "other-ca")
        shutil.copy(other_key, key)
        time.sleep(1.2)
        assert _handshake(running.target, new_ca)
    finally:
        bg_loop.run(running.stop(0))


def _free_port_pair() -> int:
    """A port P with P and P + 1000 both free (the metrics port sits 1000 above)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 1000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1000))
            except OSError:
                continue
        return port
    raise AssertionError("no free port pair")


def _spawn_echo(tmp_path: Path, name: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "twofold", "serve-echo", "--host", "127.0.0.1",
                             "--ready-file", str(tmp_path / f"{name}.json"), *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_ready(proc: subprocess.Popen[bytes], ready: Path) -> dict:
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return json.loads(ready.read_text())


def test_metrics_port_follows_the_chosen_port_and_a_taken_port_is_one_line(tmp_path: Path) -> None:
    port = _free_port_pair()
    first = _spawn_echo(tmp_path, "first", "--port", str(port))
    try:
        info = _wait_ready(first, tmp_path / "first.json")
        assert (info["port"], info["metrics_port"]) == (port, port + 1000)
        # A second server on the same gRPC port must not start and share it.
        second = subprocess.run([sys.executable, "-m", "twofold", "serve-echo", "--host", "127.0.0.1",
                                 "--port", str(port), "--metrics-port", "-1"],
                                cwd=ROOT, capture_output=True, timeout=30)
        assert second.returncode == 1
        err = second.stderr.decode()
        assert f"gRPC port {port} on 127.0.0.1" in err and "already in use" in err
        assert "Traceback" not in err
        assert len([line for line in err.splitlines() if line.startswith("twofold:")]) == 1
        # The metrics port in use: one line naming it.
        third = subprocess.run([sys.executable, "-m", "twofold", "serve-echo", "--host", "127.0.0.1",
                                "--port", "0", "--metrics-port", str(port + 1000)],
                               cwd=ROOT, capture_output=True, timeout=30)
        assert third.returncode == 1
        assert f"Prometheus metrics port {port + 1000}" in third.stderr.decode()
        assert "Traceback" not in third.stderr.decode()
    finally:
        first.terminate()
        first.wait(timeout=15)
