"""An append whose caller gave up must not stop the lake writer.

A gRPC call past its deadline is cancelled while it waits for the fsync, which cancels its
append's future; completing that future used to raise InvalidStateError in the write-ahead
thread and end it, so every later append (every later ApplyFlags/TrackEvents) waited forever.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import grpc

from protos.twofold.assignment.v1 import assignment_pb2 as pb
from protos.twofold.assignment.v1 import assignment_pb2_grpc
from tests.test_sdk_client import SECRET, start_assignment
from twofold.demo.processes import ServerGroup
from twofold.lake import LakeWriter, read_table


def _event(i: int) -> dict:
    return {"event_id": f"e{i}", "ts": dt.datetime(2026, 11, 1, tzinfo=dt.UTC), "unit": "u", "name": "n",
            "value": None, "properties": "{}"}


def test_writer_survives_cancelled_appends(tmp_path: Path) -> None:
    writer = LakeWriter(tmp_path, "events", compact_interval_s=60)
    writer.start_sync()
    try:
        cancelled = 0
        for i in range(200):
            cancelled += writer.append_nowait([_event(i)]).cancel()
        assert cancelled > 0  # some were still waiting for their fsync when their caller gave up
        writer.append_sync([_event(1000)], timeout=10)
    finally:
        writer.close_sync()
    assert "e1000" in read_table(tmp_path, "events").column("event_id").to_pylist()


def test_server_keeps_storing_after_calls_cancelled_mid_fsync(tmp_path: Path) -> None:
    with ServerGroup(tmp_path / "run") as group:
        server = start_assignment(group, tmp_path)
        with grpc.insecure_channel(server.target) as channel:
            stub = assignment_pb2_grpc.FlagResolverServiceStub(channel)
            now = pb.TrackEventsRequest().send_time
            now.GetCurrentTime()
            futures = [stub.TrackEvents.future(pb.TrackEventsRequest(
                client_secret=SECRET, send_time=now,
                events=[pb.Event(event_id=f"x{i}", unit="u", name="n", time=now)]), timeout=0.001 + i * 1e-5)
                for i in range(300)]
            for future in futures:
                try:
                    future.result()
                except grpc.RpcError:
                    pass
            time.sleep(0.2)
            answer = stub.TrackEvents(pb.TrackEventsRequest(client_secret=SECRET, send_time=now, events=[
                pb.Event(event_id="after", unit="u", name="n", time=now)]), timeout=10)
            assert answer.accepted == 1
