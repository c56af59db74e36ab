"""The assignment server end to end: real grpc.aio server on loopback, real lake, real SQLite."""

from __future__ import annotations

import argparse
import json
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import timestamp_pb2

from assignment_server.app import build_setup
from assignment_server.authoring.compiler import DEFAULT_CLIENT_SECRET
from protos.twofold.assignment.v1 import assignment_pb2 as pb
from protos.twofold.assignment.v1 import assignment_pb2_grpc as pb_grpc
from twofold.lake import read_table
from twofold.resolver import Resolver, ResolverState
from twofold.server import RunningServer, start_server
from twofold.settings import ServerSettings
from twofold.testing import BackgroundLoop

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "flags"
SECRET = DEFAULT_CLIENT_SECRET


class Harness:
    def __init__(self, bg: BackgroundLoop, tmp: Path, flags: Path) -> None:
        self.bg, self.tmp, self.flags = bg, tmp, flags
        self.lake = tmp / "lake"
        args = argparse.Namespace(flags=str(flags), lake=str(self.lake), materializations=str(tmp / "m.sqlite"),
                                  token_key=None, token_key_file=None, reload_interval=0.1)

        async def start() -> tuple[RunningServer, object]:
            service = await build_setup(args)(ServerSettings(port=0, metrics_port=0))
            running = await start_server(ServerSettings(port=0, metrics_port=0), service.services)
            running.on_stop(service.on_stop)
            await service.on_started(running)
            return running, service.services[0].servicer

        self.running, self.servicer = bg.run(start())
        self.channel = grpc.insecure_channel(self.running.target)
        self.stub = pb_grpc.FlagResolverServiceStub(self.channel)

    def resolve(self, unit: str = "user-1", flags: tuple[str, ...] = ("flags/home-ranking",), apply: bool = False,
                secret: str = SECRET, **ctx: object) -> pb.ResolveFlagsResponse:
        request = pb.ResolveFlagsRequest(flags=list(flags), client_secret=secret, apply=apply)
        request.evaluation_context.update({"targeting_key": unit, "platform": "web", **ctx})
        return self.stub.ResolveFlags(request, timeout=10)

    def metric(self, name: str) -> str:
        url = f"http://127.0.0.1:{self.running.metrics_port}/metrics"
        return "\n".join(line for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines()
                         if line.startswith(name))

    def close(self) -> None:
        self.channel.close()
        self.bg.run(self.running.stop(0))


@pytest.fixture
def harness(bg_loop: BackgroundLoop, tmp_path: Path) -> Iterator[Harness]:
    flags = tmp_path / "flags"
    shutil.copytree(EXAMPLE, flags)
    h = Harness(bg_loop, tmp_path, flags)
    try:
        yield h
    finally:
        h.close()


def _ts(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def test_resolve_matches_the_in_process_resolver(harness: Harness) -> None:
    state = ResolverState.from_json(harness.servicer.source.current.state_json)  # type: ignore[attr-defined]
    local = Resolver(state)
    for i in range(200):
        got = harness.resolve(f"user-{i}").resolved_flags[0]
        want = local.resolve(["flags/home-ranking"], {"targeting_key": f"user-{i}", "platform": "web"}, SECRET)[0]
        assert (got.variant, got.rule, got.assignment_id, got.should_apply) == \
            (want.variant, want.rule, want.assignment_id, want.should_apply)
        assert pb.ResolveReason.Name(got.reason) == want.reason.value
        assert dict(got.value) == dict(want.value or {})


def test_apply_with_token_writes_skew_corrected_exposure_once(harness: Harness) -> None:
    response = harness.resolve("user-7")
    flag = response.resolved_flags[0]
    assert flag.should_apply and response.resolve_token
    now = time.time()
    request = pb.ApplyFlagsRequest(client_secret=SECRET, resolve_token=response.resolve_token,
                                   send_time=_ts(now + 3600),  # the client clock is an hour ahead
                                   flags=[pb.AppliedFlag(flag=flag.flag, apply_time=_ts(now + 3600 - 5))])
    first = harness.stub.ApplyFlags(request, timeout=10)
    again = harness.stub.ApplyFlags(request, timeout=10)
    assert (first.accepted, first.duplicates) == (1, 0)
    assert (again.accepted, again.duplicates) == (0, 1)
    harness.bg.run(harness.servicer.exposures.flush())  # type: ignore[attr-defined]
    table = read_table(harness.lake, "exposures").to_pylist()
    assert len(table) == 1
    row = table[0]
    assert (row["unit"], row["flag"], row["variant"], row["rule"], row["resolve_id"]) == \
        ("user-7", flag.flag, flag.variant, flag.rule, response.resolve_id)
    assert abs(row["ts"].timestamp() - (now - 5)) < 2.0  # receive_time - (send_time - apply_time)


def test_resolve_with_apply_logs_exposure_and_returns_no_token(harness: Harness) -> None:
    response = harness.resolve("user-9", apply=True)
    assert not response.resolve_token
    harness.bg.run(harness.servicer.exposures.flush())  # type: ignore[attr-defined]
    rows = read_table(harness.lake, "exposures").to_pylist()
    assert [(r["unit"], r["resolve_id"]) for r in rows] == [("user-9", response.resolve_id)]


def test_forged_or_altered_tokens_are_rejected(harness: Harness) -> None:
    token = harness.resolve("user-3").resolve_token
    altered = bytearray(token)
    altered[len(altered) // 2] ^= 0x01
    for bad in (bytes(altered), b"\x01" + b"x" * 40, b"garbage"):
        with pytest.raises(grpc.RpcError) as err:
            harness.stub.ApplyFlags(pb.ApplyFlagsRequest(
                client_secret=SECRET, resolve_token=bad, send_time=_ts(time.time()),
                flags=[pb.AppliedFlag(flag="flags/home-ranking", apply_time=_ts(time.time()))]), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:  # a flag the token does not hold
        harness.stub.ApplyFlags(pb.ApplyFlagsRequest(
            client_secret=SECRET, resolve_token=token, send_time=_ts(time.time()),
            flags=[pb.AppliedFlag(flag="flags/new-checkout", apply_time=_ts(time.time()))]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert harness.resolve("user-3").resolved_flags  # still serving


@pytest.mark.parametrize(("kwargs", "code"), [
    ({"flags": ("flags/no-such-flag",)}, grpc.StatusCode.NOT_FOUND),
    ({"secret": "wrong-secret"}, grpc.StatusCode.UNAUTHENTICATED),
    ({"secret": ""}, grpc.StatusCode.UNAUTHENTICATED),
    ({"flags": tuple(f"flags/f{i}" for i in range(1001))}, grpc.StatusCode.INVALID_ARGUMENT),
])
def test_bad_requests_get_their_status_and_the_server_keeps_serving(harness: Harness, kwargs: dict,
                                                                    code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.RpcError) as err:
        harness.resolve(**kwargs)
    assert err.value.code() == code
    assert harness.resolve("user-1").resolved_flags[0].reason == pb.RESOLVE_REASON_MATCH


@pytest.mark.parametrize("key", [None, True, 3.5, {"a": 1}, ["x"], "k" * 101])
def test_bad_targeting_keys_give_a_reason_not_a_crash(harness: Harness, key: object) -> None:
    request = pb.ResolveFlagsRequest(flags=["flags/home-ranking"], client_secret=SECRET)
    ctx = {"platform": "web"} if key is None else {"targeting_key": key, "platform": "web"}
    request.evaluation_context.update(ctx)
    flag = harness.stub.ResolveFlags(request, timeout=10).resolved_flags[0]
    # Missing key: the experiment needs a unit, so only the catch-all default applies.
    expected = pb.RESOLVE_REASON_MATCH if key is None else pb.RESOLVE_REASON_TARGETING_KEY_ERROR
    assert flag.reason == expected
    if key is None:
        assert flag.rule == "flags/home-ranking/rules/default"


def test_track_events_durable_and_deduplicated(harness: Harness) -> None:
    events = [pb.Event(event_id=f"e{i}", unit=f"user-{i}", name="purchase", value=float(i)) for i in range(100)]
    events.append(pb.Event(event_id="bare", unit="user-1", name="visit"))
    events[3].properties.update({"sku": "a", "qty": 2})
    first = harness.stub.TrackEvents(pb.TrackEventsRequest(client_secret=SECRET, events=events), timeout=10)
    again = harness.stub.TrackEvents(pb.TrackEventsRequest(client_secret=SECRET, events=events[:10]), timeout=10)
    assert (first.accepted, first.duplicates, again.accepted, again.duplicates) == (101, 0, 0, 10)
    harness.bg.run(harness.servicer.events.flush())  # type: ignore[attr-defined]
    rows = {r["event_id"]: r for r in read_table(harness.lake, "events").to_pylist()}
    assert len(rows) == 101 and rows["e5"]["value"] == 5.0 and rows["bare"]["value"] is None
    assert json.loads(rows["e3"]["properties"]) == {"qty": 2.0, "sku": "a"}
    with pytest.raises(grpc.RpcError) as err:  # a bad event refuses the batch: nothing half-written
        harness.stub.TrackEvents(pb.TrackEventsRequest(client_secret=SECRET, events=[
            pb.Event(event_id="ok", unit="u", name="n"), pb.Event(event_id="", unit="u", name="n")]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:  # an oversized batch
        harness.stub.TrackEvents(pb.TrackEventsRequest(client_secret=SECRET, events=[
            pb.Event(event_id=f"x{i}", unit="u", name="n") for i in range(10_001)]), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "twofold_assignment_events_total{result=\"accepted\"}" in harness.metric("twofold_assignment_events")


def test_hot_reload_swaps_valid_and_refuses_invalid_changes(harness: Harness) -> None:
    stream = harness.stub.WatchState(pb.WatchStateRequest(client_secret=SECRET), timeout=30)
    first = next(stream)
    snapshot = json.loads(first.state)
    assert list(snapshot["clients"]) == [SECRET]
    assert ResolverState.from_json(first.state).flags.keys() >= {"flags/home-ranking"}

    path = harness.flags / "new-checkout.yaml"
    path.write_text(path.read_text().replace("percentage: 20%", "percentage: 100%"))
    second = next(stream)
    assert second.generation > first.generation
    rollout = ResolverState.from_json(second.state).segments["segments/new-checkout--gradual"]
    assert rollout.bitset is None  # 100%: every bucket
    resolved = harness.resolve("user-5", flags=("flags/new-checkout",), country="SE").resolved_flags[0]
    assert resolved.variant == "flags/new-checkout/variants/on"

    failures_before = harness.metric("twofold_assignment_reload_failures_total")
    path.write_text(path.read_text().replace('variant: on', 'variant: nope'))
    deadline = time.time() + 10
    while harness.metric("twofold_assignment_reload_failures_total") == failures_before:
        assert time.time() < deadline, "the invalid change was not noticed"
        time.sleep(0.05)
    assert harness.servicer.source.current.generation == second.generation  # type: ignore[attr-defined]
    resolved = harness.resolve("user-5", flags=("flags/new-checkout",), country="SE").resolved_flags[0]
    assert resolved.variant == "flags/new-checkout/variants/on"

    # A folder emptied by accident (or a mount in transition) is refused too.
    failures_before = harness.metric("twofold_assignment_reload_failures_total")
    for f in harness.flags.glob("*.yaml"):
        f.unlink()
    deadline = time.time() + 10
    while harness.metric("twofold_assignment_reload_failures_total") == failures_before:
        assert time.time() < deadline, "the emptied folder was not noticed"
        time.sleep(0.05)
    assert harness.resolve("user-5").resolved_flags[0].reason == pb.RESOLVE_REASON_MATCH
    stream.cancel()


def test_configmap_style_symlink_swap_is_picked_up(bg_loop: BackgroundLoop, tmp_path: Path) -> None:
    mount = tmp_path / "mount"
    v1 = mount / "..v1"
    shutil.copytree(EXAMPLE, v1)
    (mount / "..data").symlink_to("..v1")
    for f in EXAMPLE.iterdir():
        (mount / f.name).symlink_to(Path("..data") / f.name)
    h = Harness(bg_loop, tmp_path, mount)
    try:
        before = h.servicer.source.current.generation  # type: ignore[attr-defined]
        v2 = mount / "..v2"
        shutil.copytree(v1, v2)
        p = v2 / "home-ranking.yaml"
        p.write_text(p.read_text().replace("allocation: 60%", "allocation: 70%"))
        tmp_link = mount / "..data_tmp"
        tmp_link.symlink_to("..v2")
        tmp_link.replace(mount / "..data")  # the atomic rename kubelet does
        deadline = time.time() + 10
        while h.servicer.source.current.generation == before:  # type: ignore[attr-defined]
            assert time.time() < deadline
            time.sleep(0.05)
        state = h.servicer.source.current.state  # type: ignore[attr-defined]
        assert state.segments["segments/home-ranking--ranking-test"].bitset.count() == 700_000
    finally:
        h.close()


def test_metrics_by_flag_variant_reason_and_state(harness: Harness) -> None:
    harness.resolve("user-1")
    text = harness.metric("twofold_assignment_")
    assert 'twofold_assignment_resolves_total{flag="flags/home-ranking"' in text
    assert "twofold_assignment_state_generation" in text
    assert "twofold_assignment_last_reload_success_timestamp_seconds" in text


STICKY = """
flag: sticky-test
variants: {a: {x: 1}, b: {x: 2}}
rules:
  - name: exp
    when: {attribute: country, eq: SE}
    experiment: {allocation: 100%, arms: {a: 1, b: 1}, sticky: true}
"""


def test_sticky_assignments_survive_targeting_changes_and_restarts(bg_loop: BackgroundLoop, tmp_path: Path) -> None:
    flags = tmp_path / "flags"
    flags.mkdir()
    (flags / "f.yaml").write_text(STICKY)
    h = Harness(bg_loop, tmp_path, flags)
    units = [f"u{i}" for i in range(40)]
    try:
        first = {u: h.resolve(u, flags=("flags/sticky-test",), country="SE").resolved_flags[0].variant for u in units}
        assert set(first.values()) == {"flags/sticky-test/variants/a", "flags/sticky-test/variants/b"}
        # Swap the weights and narrow the audience: stored units keep their variant anyway.
        (flags / "f.yaml").write_text(STICKY.replace("{a: 1, b: 1}", "{a: 1, b: 99}").replace("eq: SE", "eq: NO"))
        generation = h.servicer.source.current.generation  # type: ignore[attr-defined]
        deadline = time.time() + 10
        while h.servicer.source.current.generation == generation:  # type: ignore[attr-defined]
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        h.close()
    h2 = Harness(bg_loop, tmp_path, flags)  # a restart: the SQLite store is the memory
    try:
        again = {u: h2.resolve(u, flags=("flags/sticky-test",), country="SE").resolved_flags[0].variant for u in units}
        assert again == first
        newcomer = h2.resolve("never-seen", flags=("flags/sticky-test",), country="SE").resolved_flags[0]
        assert newcomer.reason == pb.RESOLVE_REASON_NO_SEGMENT_MATCH  # new units follow the new targeting
    finally:
        h2.close()


def test_watch_state_skips_a_known_generation_and_local_exposures_are_accepted(harness: Harness) -> None:
    generation = harness.servicer.source.current.generation  # type: ignore[attr-defined]
    stream = harness.stub.WatchState(pb.WatchStateRequest(client_secret=SECRET, known_generation=generation),
                                     timeout=1.5)
    with pytest.raises(grpc.RpcError) as err:
        next(stream)  # nothing new to send before the deadline
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(grpc.RpcError) as err:
        next(harness.stub.WatchState(pb.WatchStateRequest(client_secret="nope"), timeout=5))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    now = time.time()
    # What the SDK's local evaluation reports: the rule, variant and assignment the state gives the unit.
    state = ResolverState.from_json(harness.servicer.source.current.state_json)  # type: ignore[attr-defined]
    mine = Resolver(state).resolve(["flags/home-ranking"], {"targeting_key": "user-1", "platform": "web"}, SECRET)[0]
    local = pb.LocalAssignment(flag="flags/home-ranking", unit="user-1", variant=mine.variant_name, rule=mine.rule,
                               assignment_id=mine.assignment_id, resolve_id="local-1", apply_time=_ts(now))
    request = pb.ApplyFlagsRequest(client_secret=SECRET, send_time=_ts(now), local_assignments=[local])
    assert harness.stub.ApplyFlags(request, timeout=10).accepted == 1
    assert harness.stub.ApplyFlags(request, timeout=10).duplicates == 1
    bad = pb.ApplyFlagsRequest(client_secret=SECRET, send_time=_ts(now), local_assignments=[
        pb.LocalAssignment(flag="flags/home-ranking", unit="user-1", variant="nope", resolve_id="l2",
                           apply_time=_ts(now))])
    with pytest.raises(grpc.RpcError) as err:
        harness.stub.ApplyFlags(bad, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    harness.bg.run(harness.servicer.exposures.flush())  # type: ignore[attr-defined]
    rows = read_table(harness.lake, "exposures").to_pylist()
    assert [(r["unit"], r["variant"], r["rule"]) for r in rows] == [("user-1", mine.variant, mine.rule)]


def test_undecodable_request_bytes_do_not_hurt_the_server(harness: Harness) -> None:
    raw = harness.channel.unary_unary("/twofold.assignment.v1.FlagResolverService/ResolveFlags",
                                      request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as err:
        raw(b"\xff\xff\xff\xff not a protobuf", timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert harness.resolve("user-1").resolved_flags[0].reason == pb.RESOLVE_REASON_MATCH


def test_a_failing_lake_is_unavailable_and_a_retry_is_accepted(harness: Harness) -> None:
    events = [pb.Event(event_id="retry-me", unit="u", name="n")]
    writer = harness.servicer.events  # type: ignore[attr-defined]
    harness.bg.run(writer.close())  # the writer refuses appends from now on
    with pytest.raises(grpc.RpcError) as err:
        harness.stub.TrackEvents(pb.TrackEventsRequest(client_secret=SECRET, events=events), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    from twofold.lake import LakeWriter

    fresh = LakeWriter(harness.lake, "events")
    harness.bg.run(fresh.start())
    harness.servicer.events = fresh  # type: ignore[attr-defined]
    reply = harness.stub.TrackEvents(pb.TrackEventsRequest(client_secret=SECRET, events=events), timeout=10)
    assert (reply.accepted, reply.duplicates) == (1, 0)  # the failed attempt did not poison the id
    harness.bg.run(fresh.close())
