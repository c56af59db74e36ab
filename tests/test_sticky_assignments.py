"""Sticky assignments across replicas, races and store failures: real server processes, real SQLite, real Redis.

Each assignment server runs as its own process (its own working folder, as replicas have), all
pointed at one store. A flag's sticky experiment is re-weighted from 50/50 to 1/99 between the
replicas (a rollout in progress); units must keep the variant they were first served.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from assignment_server.authoring.compiler import DEFAULT_CLIENT_SECRET
from protos.twofold.assignment.v1 import assignment_pb2 as pb
from protos.twofold.assignment.v1 import assignment_pb2_grpc as pb_grpc
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
FLAG = "flags/sticky-test"
STICKY = """
flag: sticky-test
variants: {a: {x: 1}, b: {x: 2}}
rules:
  - name: exp
    experiment: {allocation: 100%, arms: {a: 1, b: 1}, sticky: true}
"""
REWEIGHTED = STICKY.replace("{a: 1, b: 1}", "{a: 1, b: 99}")
UNITS = [f"unit-{i}" for i in range(2000)]
# A shared 2-core CI machine can stall a store call past the production timeout; the tests of
# races and re-weighting are about a healthy store, so they wait longer (outages have their own).
PATIENT = ("--materializations-timeout", "10")


class Server:
    """`twofold serve-assignment` as a child process on a loopback port."""

    def __init__(self, tmp: Path, name: str, flag_yaml: str, store: str, *extra: str) -> None:
        self.folder = tmp / name
        (self.folder / "flags").mkdir(parents=True)
        (self.folder / "flags" / "f.yaml").write_text(flag_yaml)
        ready = self.folder / "ready.json"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "twofold", "serve-assignment", "--flags", "flags", "--lake", "lake",
             "--materializations", store, "--port", "0", "--metrics-port", "0", "--host", "127.0.0.1",
             "--ready-file", str(ready), "--log-format", "text", "--log-level", "warning", *extra],
            cwd=self.folder, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while not ready.exists():
            if self.proc.poll() is not None or time.time() > deadline:
                self.proc.kill()
                raise AssertionError(f"server did not start: {self.proc.stderr.read().decode()}")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        self.target = f"127.0.0.1:{info['port']}"
        self.metrics_port = info["metrics_port"]

    def metric(self, name: str, **labels: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)


def _request(unit: str) -> pb.ResolveFlagsRequest:
    request = pb.ResolveFlagsRequest(flags=[FLAG], client_secret=DEFAULT_CLIENT_SECRET)
    request.evaluation_context.update({"targeting_key": unit})
    return request


async def _resolve_all(target: str, units: list[str], *, deadline: float = 10.0,
                       in_flight: int = 32) -> dict[str, pb.ResolvedFlag]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.FlagResolverServiceStub(channel)
        limit = asyncio.Semaphore(in_flight)

        async def one(unit: str) -> tuple[str, pb.ResolvedFlag]:
            async with limit:
                return unit, (await stub.ResolveFlags(_request(unit), timeout=deadline)).resolved_flags[0]

        return dict(await asyncio.gather(*(one(u) for u in units)))


def variants(target: str, units: list[str], **kw: float) -> dict[str, str]:
    return {u: f.variant for u, f in asyncio.run(_resolve_all(target, units, **kw)).items()}


def race(a: Server, b: Server, units: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Every unit's first resolve sent to both servers at once."""

    async def both() -> tuple[dict, dict]:
        return await asyncio.gather(_resolve_all(a.target, units), _resolve_all(b.target, units))

    first_a, first_b = asyncio.run(both())
    return {u: f.variant for u, f in first_a.items()}, {u: f.variant for u, f in first_b.items()}


def stored(redis_server: RedisServer, units: list[str]) -> dict[str, str]:
    """The variants Redis holds for the sticky rule, read with the server's own store class."""
    from twofold.resolver.materializations.redis import RedisMaterializations

    store = RedisMaterializations(redis_server.url, timeout=5)
    try:
        found = store.read([("materializations/sticky-test--exp", u) for u in units])
    finally:
        store.close()
    return {unit: entry["flags/sticky-test/rules/exp"] for (_, unit), entry in found.items()}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    try:
        yield started
    finally:
        for s in started:
            s.stop(signal.SIGKILL)


def _changed(before: dict[str, str], after: dict[str, str]) -> int:
    return sum(before[u] != after[u] for u in before)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_concurrent_first_resolves_serve_and_keep_the_first_write(
        backend: str, tmp_path: Path, servers: list[Server], request: pytest.FixtureRequest) -> None:
    """Two replicas mid-rollout (50/50 and 1/99) get every unit's first resolve at the same time:
    both serve the variant that is stored, and it never changes afterwards."""
    store = str(tmp_path / "shared.sqlite") if backend == "sqlite" else request.getfixturevalue("redis_server").url
    a = Server(tmp_path, "a", STICKY, store, *PATIENT)
    servers.append(a)
    b = Server(tmp_path, "b", REWEIGHTED, store, *PATIENT)
    servers.append(b)
    units = UNITS if backend == "redis" else UNITS[:1000]  # SQLite fsyncs every write: keep it short
    first_a, first_b = race(a, b, units)
    assert set(first_a.values()) == {f"{FLAG}/variants/a", f"{FLAG}/variants/b"}
    disagree = _changed(first_a, first_b)
    later_a, later_b = variants(a.target, units), variants(b.target, units)
    assert (disagree, _changed(first_a, later_a), _changed(first_a, later_b)) == (0, 0, 0)


def test_two_servers_sharing_redis_keep_every_unit_across_reweighting(
        tmp_path: Path, redis_server: RedisServer, servers: list[Server]) -> None:
    a = Server(tmp_path, "a", STICKY, redis_server.url, *PATIENT)
    servers.append(a)
    first = variants(a.target, UNITS)
    assert 900 < sum(v.endswith("/a") for v in first.values()) < 1100  # 50/50
    b = Server(tmp_path, "b", REWEIGHTED, redis_server.url, *PATIENT)
    servers.append(b)
    assert _changed(first, variants(b.target, UNITS)) == 0
    newcomers = variants(b.target, [f"new-{i}" for i in range(500)])
    assert sum(v.endswith("/b") for v in newcomers.values()) > 450  # new units follow the new weights
    # Stored once per unit and materialization, readable by any replica's store client.
    assert stored(redis_server, UNITS[:50]) == {u: first[u] for u in UNITS[:50]}


def test_redis_stopped_then_killed_and_restarted(tmp_path: Path, redis_server: RedisServer,
                                                 servers: list[Server]) -> None:
    """SIGSTOP: resolves keep answering within their deadline (served as new units, counted);
    SIGKILL and restart: the store heals and no unit loses its first variant."""
    a = Server(tmp_path, "a", STICKY, redis_server.url, "--materializations-cache", "0")
    servers.append(a)
    before = variants(a.target, UNITS[:300])

    redis_server.signal(signal.SIGSTOP)
    t0 = time.monotonic()
    during = asyncio.run(_resolve_all(a.target, UNITS[:300] + [f"outage-{i}" for i in range(300)], deadline=2.0))
    elapsed = time.monotonic() - t0
    assert all(f.reason == pb.RESOLVE_REASON_MATCH for f in during.values())  # every call answered (2 s deadline)
    assert {u: during[u].variant for u in before} == before  # rule unchanged: same bucket, same variant
    assert a.metric("twofold_assignment_materialization_calls_total", outcome="timeout") >= 1
    assert a.metric("twofold_assignment_materialization_calls_total", outcome="skipped") >= 1
    assert elapsed < 30

    redis_server.kill()
    redis_server.start()  # same port, same append-only file
    deadline = time.time() + 20
    outage_units = [f"outage-{i}" for i in range(300)]
    while True:  # heals: after the retry interval, resolves read and write again
        healed = variants(a.target, outage_units)
        written = len(stored(redis_server, outage_units))
        if written == len(outage_units) or time.time() > deadline:
            break
        time.sleep(0.3)
    assert written == len(outage_units)
    assert healed == {u: during[u].variant for u in outage_units}
    b = Server(tmp_path, "b", REWEIGHTED, redis_server.url)
    servers.append(b)
    everyone = {**before, **healed}
    assert _changed(everyone, variants(b.target, list(everyone))) == 0


def test_sigkill_of_a_server_between_read_and_write(tmp_path: Path, redis_server: RedisServer,
                                                    servers: list[Server]) -> None:
    """Writes paused in Redis (CLIENT PAUSE WRITE) hold a server between its read and its write;
    SIGKILL it there: none of its resolves was answered, and every replica then serves, for
    every unit, the one variant that is stored."""
    a = Server(tmp_path, "a", STICKY, redis_server.url, "--materializations-timeout", "30")
    servers.append(a)
    units = UNITS[:200]
    admin = redis_server.client()
    admin.config_resetstat()
    admin.execute_command("CLIENT", "PAUSE", "30000", "WRITE")

    async def in_flight() -> list[BaseException | tuple]:
        async with grpc.aio.insecure_channel(a.target) as channel:
            stub = pb_grpc.FlagResolverServiceStub(channel)
            calls = [asyncio.ensure_future(stub.ResolveFlags(_request(u), timeout=60)) for u in units]
            deadline = time.time() + 30
            while admin.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0) < 16:
                assert time.time() < deadline
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # reads answered (one per store thread), writes blocked in Redis
            a.stop(signal.SIGKILL)
            return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(in_flight())
    admin.execute_command("CLIENT", "UNPAUSE")
    admin.close()
    assert all(isinstance(o, grpc.aio.AioRpcError) and o.code() == grpc.StatusCode.UNAVAILABLE for o in outcomes)
    b = Server(tmp_path, "b", REWEIGHTED, redis_server.url)
    servers.append(b)
    c = Server(tmp_path, "c", STICKY, redis_server.url)
    servers.append(c)
    first_b, first_c = race(b, c, units)
    assert _changed(first_b, first_c) == 0
    assert stored(redis_server, units) == first_b
    assert _changed(first_b, variants(c.target, units)) == 0


def test_redis_url_password_is_not_logged() -> None:
    from twofold.resolver.materializations.redis import RedisMaterializations, redact

    assert redact("rediss://user:s3cret@redis.example:6380/2") == "rediss://user:***@redis.example:6380/2"
    assert redact("redis://:s3cret@h/0") == "redis://:***@h/0"
    assert not re.search("s3cret", RedisMaterializations("redis://:s3cret@127.0.0.1:1/0").describe())
