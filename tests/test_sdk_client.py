"""The SDK against a real assignment server (`python -m twofold serve-assignment`) on loopback.

Covers resolve and decide, exposure on use (batched, deduplicated, in the lake), track with
client-made ids, failure behaviour when the server is stopped mid-run (STALE, default,
within the deadline, nothing lost once it is back), several replicas behind one target,
local evaluation from the state stream, and the asyncio flavour.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.compute as pc
import pytest

from client_sdk import (
    AsyncClient,
    Client,
    ClientOptions,
    Deadlines,
    ErrorCode,
    Reason,
    SystemAnswer,
    SystemCall,
    TlsConfig,
    TwofoldError,
)
from tests.tls_certs import issue, make_ca
from twofold.demo.processes import ServerGroup, ServerProcess
from twofold.lake import read_table

SECRET = "test-secret"
FLAGS_YAML = """\
flag: home-ranking
variants:
  static: {system: static, theme: editorial}
  ranker: {system: model, model: home-ranker, top_k: 1}
  bandit: {system: bandit, model: home-linucb}
default: static
rules:
  - name: ranking-test
    experiment:
      allocation: 100%
      arms: {static: 1, ranker: 1, bandit: 1}
---
flag: checkout
variants:
  "off": {enabled: false, color: blue, discount: 0, ratio: 0.5, tags: [a]}
  "on": {enabled: true, color: green, discount: 10, ratio: 0.25, tags: [b]}
rules:
  - name: sweden
    when: {attribute: country, eq: SE}
    serve: "on"
---
flag: banner
variants:
  picks: {system: editorial-picks, slot: 2}
rules:
  - name: everyone
    serve: picks
---
flag: sticky-test
variants:
  a: {system: static, layout: a}
  b: {system: static, layout: b}
rules:
  - name: sticky
    experiment:
      allocation: 100%
      arms: {a: 1, b: 1}
      sticky: true
---
client: backend
secrets:
  - secret: test-secret
"""


def write_flags(folder: Path, text: str = FLAGS_YAML) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".flags.yaml.tmp"
    tmp.write_text(text)
    tmp.replace(folder / "flags.yaml")
    return folder


def start_assignment(group: ServerGroup, base: Path, name: str = "assignment", port: int = 0,
                     lake: Path | None = None, extra: tuple[str, ...] = (),
                     writer_id: str | None = None) -> ServerProcess:
    """A real assignment server over `base/flags`, its lake under `base/lake` (or `lake`).

    Its lake writer id is `writer_id` or `name`: a restart that must recover the log of the server
    it replaces passes that server's id (as a StatefulSet pod keeps its name).
    """
    key_file = base / "token.key"
    if not key_file.exists():
        key_file.write_text(base64.b64encode(os.urandom(32)).decode())
    if not (base / "flags").exists():
        write_flags(base / "flags")
    return group.start(name, ["serve-assignment", "--flags", str(base / "flags"), "--lake", str(lake or base / "lake"),
                              "--token-key-file", str(key_file), "--reload-interval", "0.2",
                              "--materializations", "memory", "--log-format", "text", "--writer-id", writer_id or name,
                              *extra], port=port)


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    """Sum of a Prometheus series on a running server, over series matching `labels`."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def resolves_served(server: ServerProcess) -> float:
    return metric(server, "grpc_server_handled_total", grpc_method="ResolveFlags", grpc_code="OK")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    base = tmp_path_factory.mktemp("assignment")
    with ServerGroup(base / "run") as group:
        yield start_assignment(group, base), base


@pytest.fixture
def server(shared: tuple[ServerProcess, Path]) -> ServerProcess:
    return shared[0]


def _opts(**kw: object) -> ClientOptions:
    return ClientOptions(flush_at_exit=False, **kw)  # type: ignore[arg-type]


def test_resolve_assigns_and_is_sticky(server: ServerProcess) -> None:
    with Client(server.target, client_secret=SECRET, options=_opts()) as client:
        first = {u: client.resolve("home-ranking", f"user-{u}").variant for u in range(300)}
        again = {u: client.resolve("flags/home-ranking", f"user-{u}").variant for u in range(300)}
        assert first == again
        counts = {v: list(first.values()).count(v) for v in ("static", "ranker", "bandit")}
        assert sum(counts.values()) == 300 and min(counts.values()) > 60, counts
        r = client.resolve("home-ranking", "user-1")
        assert r.reason is Reason.MATCH and r.should_apply and r.resolve_id and r.rule.endswith("ranking-test")
        assert r.value["system"] in ("static", "model", "bandit")
        se = client.resolve("checkout", "u1", {"country": "SE"}, default={"enabled": False})
        assert (se.variant, se.value["color"], se.reason) == ("on", "green", Reason.MATCH)
        us = client.resolve("checkout", "u1", {"country": "US"}, default={"enabled": "default"})
        assert (us.variant, us.value, us.reason) == (None, {"enabled": "default"}, Reason.NO_SEGMENT_MATCH)
        many = client.resolve_many(["home-ranking", "checkout"], "user-1", {"country": "SE"})
        assert many["home-ranking"].variant == first[1] and many["checkout"].variant == "on"


def test_bad_requests_give_defaults_with_errors_or_raise_when_strict(server: ServerProcess) -> None:
    with Client(server.target, client_secret=SECRET, options=_opts()) as client:
        missing = client.resolve("no-such-flag", "u1", default="d")
        assert (missing.value, missing.reason, missing.error_code) == ("d", Reason.ERROR, ErrorCode.FLAG_NOT_FOUND)
        bad_context = client.resolve("checkout", "u1", {"when": object()}, default="d")
        assert (bad_context.reason, bad_context.error_code) == (Reason.ERROR, ErrorCode.INVALID_CONTEXT)
        decision = client.decide("no-such-flag", "u1", default="fallback-page")
        assert (decision.value, decision.reason, decision.system) == ("fallback-page", Reason.ERROR, None)
    with Client(server.target, client_secret="wrong", options=_opts()) as client:
        wrong = client.resolve("checkout", "u1", default="d")
        assert (wrong.value, wrong.error_code) == ("d", ErrorCode.UNAUTHENTICATED)
    with Client(server.target, client_secret=SECRET, options=_opts(strict=True)) as strict:
        with pytest.raises(TwofoldError) as err:
            strict.resolve("no-such-flag", "u1")
        assert err.value.code is ErrorCode.FLAG_NOT_FOUND


def test_decide_static_exposes_once_and_events_land_in_the_lake(tmp_path: Path) -> None:
    with ServerGroup(tmp_path / "run") as group:
        server = start_assignment(group, tmp_path)
        units = [f"buyer-{i}" for i in range(40)]
        with Client(server.target, client_secret=SECRET, options=_opts(flush_interval=0.2)) as client:
            decisions = {}
            for unit in units:
                decisions[unit] = client.decide("checkout", unit, {"country": "SE"}, default={"enabled": False})
                client.decide("checkout", unit, {"country": "SE"})  # used again: no second exposure
            assert all(d.system == "static" and d.value["enabled"] is True for d in decisions.values())
            event_ids = [client.track("purchase", unit, 9.5, properties={"sku": "x"}) for unit in units]
            event_ids.append(client.track("view", units[0]))
            assert client.flush()
            stats = client.stats
            assert stats.exposures_sent == 40 and stats.exposures_deduplicated == 40
            assert stats.events_sent == 41 and stats.flush_failures == 0
        assert group.stop("assignment") == 0  # drains and compacts the write-ahead log
        exposures = read_table(tmp_path / "lake", "exposures")
        assert sorted(exposures.column("unit").to_pylist()) == sorted(units)
        assert set(exposures.column("flag").to_pylist()) == {"flags/checkout"}
        assert set(exposures.column("variant").to_pylist()) == {"flags/checkout/variants/on"}
        events = read_table(tmp_path / "lake", "events")
        assert sorted(events.column("event_id").to_pylist()) == sorted(event_ids)
        purchases = events.filter(pc.equal(events.column("name"), "purchase"))
        assert purchases.num_rows == 40 and set(purchases.column("value").to_pylist()) == {9.5}
        view = events.filter(pc.equal(events.column("name"), "view"))
        assert view.column("value").to_pylist() == [None]


def test_assignment_down_serves_stale_or_default_within_deadline_and_delivers_later(tmp_path: Path) -> None:
    deadline = 0.25
    with ServerGroup(tmp_path / "run") as group:
        server = start_assignment(group, tmp_path)
        port = server.port
        options = _opts(deadlines=Deadlines(resolve=deadline, apply=1.0, track=1.0), flush_interval=0.2)
        with Client(server.target, client_secret=SECRET, options=options) as client:
            before = client.decide("checkout", "known-user", {"country": "SE"}, default={"enabled": False})
            assert before.reason is Reason.MATCH
            assert client.flush()
            server.kill()  # SIGKILL mid-run

            started = time.monotonic()
            stale = client.decide("checkout", "known-user", {"country": "SE"}, default={"enabled": False})
            fresh = client.decide("checkout", "new-user", {"country": "SE"}, default={"enabled": False})
            elapsed = time.monotonic() - started
            assert elapsed < 2 * deadline + 0.2, elapsed
            assert (stale.reason, stale.value["enabled"], stale.variant) == (Reason.STALE, True, "on")
            assert stale.flag_result is not None and stale.flag_result.error_code in (
                ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED)
            assert (fresh.reason, fresh.value, fresh.variant) == (Reason.DEFAULT, {"enabled": False}, None)
            event_id = client.track("purchase", "known-user", 3.0)
            assert not client.flush()  # the event stays queued while the server is away
            assert client.stats.flush_failures >= 1 and client.stats.events_dropped == 0

            # Back on the same port, same lake: the queued event goes out with the next flush.
            start_assignment(group, tmp_path, name="assignment-again", port=port, writer_id="assignment")
            deadline_at = time.monotonic() + 15
            while client.stats.events_sent == 0 and time.monotonic() < deadline_at:
                time.sleep(0.1)
            assert client.stats.events_sent == 1
            # Resolves recover too, once each pooled channel has reconnected (backoff <= 2 s).
            while not all(client.resolve("checkout", "probe", {"country": "US"}).reason is Reason.NO_SEGMENT_MATCH
                          for _ in range(4)):
                assert time.monotonic() < deadline_at
                time.sleep(0.1)
            assert client.decide("checkout", "new-user", {"country": "SE"}).reason is Reason.MATCH
            assert client.flush()
        group.stop_all()
        events = read_table(tmp_path / "lake", "events")
        assert events.column("event_id").to_pylist() == [event_id]
        exposed = set(read_table(tmp_path / "lake", "exposures").column("unit").to_pylist())
        assert exposed == {"known-user", "new-user"}


def test_strict_client_raises_when_the_server_is_down(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with Client(f"127.0.0.1:{port}", client_secret=SECRET, options=_opts(strict=True)) as client, \
            pytest.raises(TwofoldError) as err:
        client.decide("checkout", "u1")
    assert err.value.code is ErrorCode.UNAVAILABLE


def test_a_hung_server_costs_no_more_than_the_deadline() -> None:
    """A peer that accepts connections but never answers: the deadline, not a hang, decides."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        options = _opts(deadlines=Deadlines(resolve=0.2))
        with Client(f"127.0.0.1:{listener.getsockname()[1]}", client_secret=SECRET, options=options) as client:
            started = time.monotonic()
            decision = client.decide("checkout", "u1", default="plain")
            assert time.monotonic() - started < 1.0
            assert (decision.value, decision.reason) == ("plain", Reason.DEFAULT)
            assert decision.flag_result is not None
            assert decision.flag_result.error_code in (ErrorCode.DEADLINE_EXCEEDED, ErrorCode.UNAVAILABLE)
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()


def test_two_replicas_share_the_load_and_survive_losing_one(tmp_path: Path) -> None:
    with ServerGroup(tmp_path / "run") as group:
        a = start_assignment(group, tmp_path, name="replica-a")
        b = start_assignment(group, tmp_path, name="replica-b")
        target = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"
        with Client(target, client_secret=SECRET, options=_opts(channels=2)) as client:
            variants = {u: client.resolve("home-ranking", f"u{u}").variant for u in range(60)}
            assert resolves_served(a) >= 10 and resolves_served(b) >= 10  # round robin, not pick-first
            a.kill()
            results = [client.resolve("home-ranking", f"u{u}") for u in range(60)]
            # Every call still reached a live replica (retried on UNAVAILABLE, or balanced away).
            assert all(r.reason is Reason.MATCH for r in results), [r.error_message for r in results][:3]
            assert {u: r.variant for u, r in enumerate(results)} == variants


def test_dns_target(server: ServerProcess) -> None:
    with Client(f"dns:///localhost:{server.port}", client_secret=SECRET, options=_opts()) as client:
        assert client.resolve("checkout", "u1", {"country": "SE"}).reason is Reason.MATCH


def test_local_evaluation_matches_the_server_without_calls(tmp_path: Path) -> None:
    with ServerGroup(tmp_path / "run") as group:
        server = start_assignment(group, tmp_path)
        with Client(server.target, client_secret=SECRET, options=_opts()) as remote, \
                Client(server.target, client_secret=SECRET, options=_opts(local_evaluation=True)) as local:
            assert local.wait_for_state(10) and local.state_generation > 0
            calls_before = resolves_served(server)
            units = [f"user-{i}" for i in range(200)]
            local_results = [local.resolve("home-ranking", u) for u in units]
            assert resolves_served(server) == calls_before  # no call per resolve
            remote_results = [remote.resolve("home-ranking", u) for u in units]
            assert [r.variant for r in local_results] == [r.variant for r in remote_results]
            assert [r.value for r in local_results] == [r.value for r in remote_results]
            assert all(r.local and r.reason is Reason.MATCH for r in local_results)
            for unit in units[:25]:
                local.decide("checkout", unit, {"country": "SE"})
            assert local.flush() and local.stats.exposures_sent == 25
            # A sticky experiment needs the server's stored assignments: resolved remotely, once.
            calls_before = resolves_served(server)
            sticky = local.resolve_many(["sticky-test", "checkout"], "user-7", {"country": "SE"})
            assert resolves_served(server) == calls_before + 1
            assert sticky["sticky-test"].reason is Reason.MATCH and not sticky["sticky-test"].local
            assert sticky["sticky-test"].variant == remote.resolve("sticky-test", "user-7").variant
            assert sticky["checkout"].local and sticky["checkout"].variant == "on"
            missing = local.resolve("no-such-flag", "u1", default=1)
            assert (missing.value, missing.error_code) == (1, ErrorCode.FLAG_NOT_FOUND)

            # A flag change reaches the client through the stream.
            generation = local.state_generation
            write_flags(tmp_path / "flags", FLAGS_YAML.replace("color: green", "color: purple"))
            deadline_at = time.monotonic() + 15
            while local.state_generation == generation and time.monotonic() < deadline_at:
                time.sleep(0.05)
            assert local.state_generation > generation
            assert local.resolve("checkout", "u1", {"country": "SE"}).value["color"] == "purple"
        group.stop_all()
        exposures = read_table(tmp_path / "lake", "exposures")
        assert sorted(exposures.column("unit").to_pylist()) == sorted(units[:25])
        assert set(exposures.column("variant").to_pylist()) == {"flags/checkout/variants/on"}


def test_local_evaluation_before_any_state_serves_defaults() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with Client(f"127.0.0.1:{port}", client_secret=SECRET, options=_opts(local_evaluation=True)) as client:
        assert not client.wait_for_state(0.2)
        result = client.resolve("checkout", "u1", default="d")
        assert (result.value, result.reason, result.error_code) == ("d", Reason.DEFAULT, ErrorCode.PROVIDER_NOT_READY)


def test_async_client_resolves_decides_and_tracks(tmp_path: Path) -> None:
    with ServerGroup(tmp_path / "run") as group:
        server = start_assignment(group, tmp_path)

        async def main() -> tuple[list[str | None], list[str | None], str]:
            async with AsyncClient(server.target, client_secret=SECRET, options=_opts()) as client:
                decisions = await asyncio.gather(*(client.decide("checkout", f"a{i}", {"country": "SE"})
                                                   for i in range(30)))
                event_id = client.track("purchase", "a0", 1.5)
                assert await client.flush()
                assert client.stats.exposures_sent == 30 and client.stats.events_sent == 1
                async with AsyncClient(server.target, client_secret=SECRET,
                                       options=_opts(local_evaluation=True)) as local:
                    assert await local.wait_for_state(10)
                    local_variants = [(await local.resolve("home-ranking", f"a{i}")).variant for i in range(30)]
                remote_variants = [(await client.resolve("home-ranking", f"a{i}")).variant for i in range(30)]
                assert all(d.reason is Reason.MATCH and d.value["color"] == "green" for d in decisions)
                return local_variants, remote_variants, event_id

        local_variants, remote_variants, event_id = asyncio.run(main())
        assert local_variants == remote_variants
        group.stop_all()
        assert read_table(tmp_path / "lake", "events").column("event_id").to_pylist() == [event_id]
        assert read_table(tmp_path / "lake", "exposures").num_rows == 30


def test_registered_system_serves_its_arm(server: ServerProcess) -> None:
    with Client(server.target, client_secret=SECRET, options=_opts()) as client:
        unknown = client.decide("banner", "u1", default="house-ad")
        assert (unknown.reason, unknown.error_code, unknown.value) == \
            (Reason.FALLBACK, ErrorCode.UNKNOWN_SYSTEM, "house-ad")
        calls = []

        def picks(call: SystemCall) -> SystemAnswer:
            calls.append(call)
            return SystemAnswer(value=f"pick-{call.arm['slot']:.0f}-{call.context['country']}", model="picks-v1")

        client.register_system("editorial-picks", picks)
        with pytest.raises(ValueError, match="built-in"):
            client.register_system("static", picks)
        decision = client.decide("banner", "u1", {"country": "SE"}, default="house-ad")
        assert (decision.value, decision.system, decision.model, decision.reason, decision.variant) == \
            ("pick-2-SE", "editorial-picks", "picks-v1", Reason.MATCH, "picks")
        assert calls[0].unit == "u1" and calls[0].variant == "picks"

        def broken(call: SystemCall) -> str:
            raise RuntimeError("picks database down")

        client.register_system("editorial-picks", broken)
        failed = client.decide("banner", "u2", {"country": "SE"}, default="house-ad")
        assert (failed.value, failed.reason) == ("house-ad", Reason.FALLBACK)
        assert failed.error_code is ErrorCode.SYSTEM_FAILED
        assert "picks database down" in (failed.error_message or "")
        assert client.stats.fallbacks_served == 2


EXIT_SCRIPT = """
import asyncio, sys
from client_sdk import AsyncClient, Client, ClientOptions
target, flavour = sys.argv[1], sys.argv[2]
options = ClientOptions(flush_interval=3600)  # nothing is sent before the interpreter exits
if flavour == "sync":
    client = Client(target, client_secret="test-secret", options=options)
    client.decide("checkout", "exit-sync", {"country": "SE"})
    client.track("purchase", "exit-sync", 1.0)
else:
    async def main():
        client = AsyncClient(target, client_secret="test-secret", options=options)
        await client.decide("checkout", "exit-async", {"country": "SE"})
        client.track("purchase", "exit-async", 2.0)
    asyncio.run(main())
print("exiting without close()")
"""


def test_queued_records_are_flushed_at_interpreter_exit(tmp_path: Path) -> None:
    from twofold.demo.processes import ROOT

    with ServerGroup(tmp_path / "run") as group:
        server = start_assignment(group, tmp_path)
        for flavour in ("sync", "async"):
            done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, server.target, flavour], cwd=ROOT,
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0 and "exiting" in done.stdout, done.stderr[-2000:]
        group.stop_all()
    exposures = read_table(tmp_path / "lake", "exposures")
    assert sorted(exposures.column("unit").to_pylist()) == ["exit-async", "exit-sync"]
    events = read_table(tmp_path / "lake", "events")
    assert sorted(zip(events.column("unit").to_pylist(), events.column("value").to_pylist(), strict=True)) == \
        [("exit-async", 2.0), ("exit-sync", 1.0)]


def test_many_threads_share_one_client(tmp_path: Path) -> None:
    with ServerGroup(tmp_path / "run") as group:
        server = start_assignment(group, tmp_path)
        units = [f"t{i}" for i in range(400)]
        with Client(server.target, client_secret=SECRET, options=_opts(flush_interval=0.05, batch_size=16)) as client:
            def work(unit: str) -> tuple[str | None, str]:
                decision = client.decide("home-ranking", unit)
                return decision.variant, client.track("purchase", unit, 1.0)

            with ThreadPoolExecutor(8) as pool:
                results = list(pool.map(work, units))
            assert client.flush()
            assert all(variant in ("static", "ranker", "bandit") for variant, _ in results)
            assert client.stats.exposures_sent == 400 and client.stats.events_sent == 400
        group.stop_all()
        assert sorted(read_table(tmp_path / "lake", "exposures").column("unit").to_pylist()) == sorted(units)
        assert sorted(read_table(tmp_path / "lake", "events").column("event_id").to_pylist()) == \
            sorted(event_id for _, event_id in results)


def test_tls_and_mutual_tls(tmp_path: Path) -> None:
    ca_pem, ca_key, ca_cert = make_ca()
    files = {"ca": ca_pem.cert}
    for name, pem in (("server", issue(ca_key, ca_cert, "localhost", server=True)),
                      ("client", issue(ca_key, ca_cert, "backend", server=False))):
        files[f"{name}_cert"], files[f"{name}_key"] = pem.cert, pem.key
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / f"{name}.pem"
        paths[name].write_bytes(data)
    with ServerGroup(tmp_path / "run") as group:
        server = start_assignment(group, tmp_path, extra=(
            "--tls-cert", str(paths["server_cert"]), "--tls-key", str(paths["server_key"]),
            "--tls-client-ca", str(paths["ca"])))
        mutual = TlsConfig(root_certificates=paths["ca"], certificate_chain=paths["client_cert"],
                           private_key=paths["client_key"], server_name="localhost")
        with Client(server.target, client_secret=SECRET, options=_opts(tls=mutual)) as client:
            assert client.resolve("checkout", "u1", {"country": "SE"}).reason is Reason.MATCH
            client.track("purchase", "u1", 1.0)
            assert client.flush()
        # Without a client certificate the server refuses the handshake: the default, with the error.
        anonymous = TlsConfig(root_certificates=paths["ca"], server_name="localhost")
        with Client(server.target, client_secret=SECRET, options=_opts(tls=anonymous)) as client:
            refused = client.resolve("checkout", "u1", {"country": "SE"}, default="d")
            assert (refused.value, refused.reason, refused.error_code) == ("d", Reason.DEFAULT, ErrorCode.UNAVAILABLE)


def test_async_client_that_only_tracks_delivers_in_the_background(server: ServerProcess) -> None:
    async def main() -> tuple[int, int]:
        client = AsyncClient(server.target, client_secret=SECRET, options=_opts(flush_interval=0.05))
        client.track("purchase", "only-tracks", 1.0)  # no await before: the client starts on this call
        for _ in range(100):
            if client.stats.events_sent:
                break
            await asyncio.sleep(0.05)
        before_close = client.stats.events_sent
        client.track("purchase", "only-tracks", 2.0)
        await client.close()
        return before_close, client.stats.events_sent

    assert asyncio.run(main()) == (1, 2)


def test_close_right_after_a_wake_up_neither_hangs_nor_loses_the_event(server: ServerProcess) -> None:
    """track() wakes the flush loop (batch_size 1) and close() cancels it in the same loop turn.

    With `asyncio.wait_for` around the loop's wait, Python 3.11 lost that cancellation and
    close() waited for the loop forever (how `twofold demo` hung); see twofold/waiting.py.
    """
    async def main() -> tuple[bool, int]:
        client = AsyncClient(server.target, client_secret=SECRET, options=_opts(flush_interval=30, batch_size=1))
        client.track("purchase", "closes-early", 1.0)
        for _ in range(100):  # the first event goes out on the wake-up; then the loop waits again
            if client.stats.events_sent:
                break
            await asyncio.sleep(0.05)
        client.track("purchase", "closes-early", 2.0)  # sets the wake-up ...
        closing = asyncio.ensure_future(client.close())  # ... and close() cancels the loop at once
        done, _ = await asyncio.wait({closing}, timeout=15)
        return bool(done), client.stats.events_sent

    assert asyncio.run(main()) == (True, 2)
