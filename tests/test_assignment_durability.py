"""Kill -9 the real server process: everything acknowledged is in the lake exactly once after restart,
and units keep their variants across restarts and across processes."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from google.protobuf import timestamp_pb2

from assignment_server.authoring.compiler import DEFAULT_CLIENT_SECRET
from protos.twofold.assignment.v1 import assignment_pb2 as pb
from protos.twofold.assignment.v1 import assignment_pb2_grpc as pb_grpc
from tests.ready import wait_ready
from twofold.lake import iter_ids, read_table

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "flags"
KEY = base64.b64encode(b"k" * 32).decode()


def _start(tmp: Path, name: str) -> tuple[subprocess.Popen, int]:
    ready = tmp / f"{name}.ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "twofold", "serve-assignment", "--flags", str(EXAMPLE), "--lake", str(tmp / "lake"),
         "--materializations", str(tmp / "m.sqlite"), "--port", "0", "--metrics-port", "-1",
         "--host", "127.0.0.1", "--ready-file", str(ready), "--log-format", "text", "--log-level", "warning"],
        cwd=ROOT, env={**os.environ, "TWOFOLD_TOKEN_KEY": KEY}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, wait_ready(proc, ready)["port"]


def _variants(port: int, units: list[str]) -> list[str]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.FlagResolverServiceStub(channel)
        out = []
        for u in units:
            request = pb.ResolveFlagsRequest(flags=["flags/home-ranking"], client_secret=DEFAULT_CLIENT_SECRET)
            request.evaluation_context.update({"targeting_key": u, "platform": "web"})
            out.append(stub.ResolveFlags(request, timeout=10).resolved_flags[0].variant)
        return out


def test_sigkill_loses_no_acknowledged_event_and_duplicates_none(tmp_path: Path) -> None:
    proc, port = _start(tmp_path, "a")
    acknowledged: list[str] = []
    units = [f"user-{i}" for i in range(50)]
    before = _variants(port, units)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.FlagResolverServiceStub(channel)
        for batch in range(20):
            events = [pb.Event(event_id=f"b{batch}-{i}", unit=f"user-{i}", name="purchase", value=1.0)
                      for i in range(100)]
            stub.TrackEvents(pb.TrackEventsRequest(client_secret=DEFAULT_CLIENT_SECRET, events=events), timeout=10)
            acknowledged.extend(e.event_id for e in events)
        token_response = stub.ResolveFlags(_request("user-1"), timeout=10)
        applied = []
        for i in range(30):  # exposures logged at resolve time, acknowledged = durable
            request = _request(f"exposed-{i}")
            request.apply = True
            applied.append(stub.ResolveFlags(request, timeout=10).resolve_id)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)

    proc2, port2 = _start(tmp_path, "b")  # recovers the dead writer's write-ahead segments
    try:
        after = _variants(port2, units)
        assert after == before  # same unit, same variant across restarts
        with grpc.insecure_channel(f"127.0.0.1:{port2}") as channel:  # a token survives restarts (fixed key)
            stub = pb_grpc.FlagResolverServiceStub(channel)
            now = time.time()
            reply = stub.ApplyFlags(pb.ApplyFlagsRequest(
                client_secret=DEFAULT_CLIENT_SECRET, resolve_token=token_response.resolve_token,
                send_time=_ts(now), flags=[pb.AppliedFlag(flag="flags/home-ranking", apply_time=_ts(now))]),
                timeout=10)
            assert reply.accepted == 1
    finally:
        proc2.send_signal(signal.SIGTERM)
        proc2.wait(timeout=30)
    ids = list(iter_ids(tmp_path / "lake", "events"))
    assert sorted(ids) == sorted(acknowledged)  # every acknowledged event, each exactly once
    exposures = read_table(tmp_path / "lake", "exposures", dedup=False).to_pylist()
    assert len(exposures) == 31 and len({e["exposure_id"] for e in exposures}) == 31
    assert {e["resolve_id"] for e in exposures} == {*applied, token_response.resolve_id}


def _request(unit: str) -> pb.ResolveFlagsRequest:
    request = pb.ResolveFlagsRequest(flags=["flags/home-ranking"], client_secret=DEFAULT_CLIENT_SECRET)
    request.evaluation_context.update({"targeting_key": unit, "platform": "web"})
    return request


def _ts(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def test_same_variant_in_another_process(tmp_path: Path) -> None:
    """A separate Python process compiling the same files resolves every unit identically."""
    code = (
        "import json,sys\n"
        "from assignment_server.authoring.compiler import compile_folder, DEFAULT_CLIENT_SECRET\n"
        "from twofold.resolver import Resolver, ResolverState\n"
        f"r = Resolver(ResolverState.from_json(compile_folder({str(EXAMPLE)!r}).state_json()))\n"
        "print(json.dumps([r.resolve(['flags/home-ranking'], {'targeting_key': f'user-{i}', 'platform': 'web'},"
        " DEFAULT_CLIENT_SECRET)[0].variant for i in range(2000)]))\n")
    outs = [subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}) for seed in (1, 2)]
    for o in outs:
        assert o.returncode == 0, o.stderr
    a, b = (json.loads(o.stdout) for o in outs)
    assert a == b and len(set(a)) == 3


def test_a_batch_resent_after_a_sigkill_is_answered_as_duplicates_and_stored_once(tmp_path: Path) -> None:
    """Issue 14.6. The server stores a batch and is killed before the client sees the answer (here: the
    answer is dropped, which the server cannot tell apart); the client resends to the restarted
    server. One batch was already published as Parquet before the kill, one was still only in the
    write-ahead log: both must be recognised, as must a resent ApplyFlags."""
    proc, port = _start(tmp_path, "a")
    published = [pb.Event(event_id=f"pub-{i}", unit=f"user-{i}", name="purchase", value=1.0) for i in range(40)]
    in_log = [pb.Event(event_id=f"wal-{i}", unit=f"user-{i}", name="purchase", value=2.0) for i in range(40)]
    now = time.time()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.FlagResolverServiceStub(channel)
            stub.TrackEvents(pb.TrackEventsRequest(client_secret=DEFAULT_CLIENT_SECRET, events=published), timeout=10)
            token = stub.ResolveFlags(_request("user-7"), timeout=10).resolve_token
            apply = pb.ApplyFlagsRequest(client_secret=DEFAULT_CLIENT_SECRET, resolve_token=token, send_time=_ts(now),
                                         flags=[pb.AppliedFlag(flag="flags/home-ranking", apply_time=_ts(now))])
            assert stub.ApplyFlags(apply, timeout=10).accepted == 1
            deadline = time.time() + 30  # the writer publishes a segment every ~2 s
            while len(list((tmp_path / "lake" / "events").glob("date=*/*.parquet"))) == 0:
                assert time.time() < deadline, "the first batch was never published"
                time.sleep(0.05)
            stub.TrackEvents(pb.TrackEventsRequest(client_secret=DEFAULT_CLIENT_SECRET, events=in_log), timeout=10)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    proc2, port2 = _start(tmp_path, "b")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port2}") as channel:
            stub = pb_grpc.FlagResolverServiceStub(channel)
            for batch in (published, in_log):
                reply = stub.TrackEvents(pb.TrackEventsRequest(client_secret=DEFAULT_CLIENT_SECRET, events=batch),
                                         timeout=10)
                assert (reply.accepted, reply.duplicates) == (0, 40)
            reply = stub.ApplyFlags(apply, timeout=10)
            assert (reply.accepted, reply.duplicates) == (0, 1)
    finally:
        proc2.send_signal(signal.SIGTERM)
        proc2.wait(timeout=30)
    ids = list(iter_ids(tmp_path / "lake", "events"))
    assert sorted(ids) == sorted(e.event_id for e in published + in_log)  # each stored exactly once
    assert len(list(iter_ids(tmp_path / "lake", "exposures"))) == 1
