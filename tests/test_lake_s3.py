"""The lake on `s3://`, against a real S3 API server on loopback (moto's standalone server): writers,
SIGKILL recovery, a real assignment server, the analysis and bandit training read the same URL and
get the same answers as from a local lake."""

from __future__ import annotations

import base64
import datetime as dt
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pyarrow.fs as pafs
import pytest

from analysis_worker.analyze import analyze
from analysis_worker.synthetic import write_synthetic_lake
from assignment_server.authoring.compiler import DEFAULT_CLIENT_SECRET
from protos.twofold.assignment.v1 import assignment_pb2 as pb
from protos.twofold.assignment.v1 import assignment_pb2_grpc as pb_grpc
from tests.ready import wait_ready
from tests.s3_server import S3Server
from twofold.lake import LakeWriter, iter_ids, read_table
from twofold.lakestore import LakeStoreError, open_store

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = ROOT / "tests" / "data" / "home-ranking-analysis.yaml"  # matches analysis_worker.synthetic
LATER = dt.datetime(2026, 12, 31, tzinfo=dt.UTC)


def _events(prefix: str, n: int, day: int = 1) -> list[dict]:
    return [{"event_id": f"{prefix}{i}", "ts": dt.datetime(2026, 11, day, 12, tzinfo=dt.UTC) + dt.timedelta(seconds=i),
             "unit": f"u{i % 5}", "name": "purchase", "value": float(i), "properties": "{}"} for i in range(n)]


def test_a_writer_publishes_to_s3_under_deterministic_names(s3_env: S3Server, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    lake = f"s3://{s3_env.new_bucket()}/lake"
    writer = LakeWriter(lake, "events", writer_id="pod-0", wal_dir=tmp_path / "wal", compact_interval_s=60)
    writer.start_sync()
    try:
        writer.append_sync(_events("a", 10, day=1))
        writer.append_sync(_events("b", 5, day=2))
        writer.flush_sync()
    finally:
        writer.close_sync()
    table = read_table(lake, "events")
    assert sorted(table["event_id"].to_pylist()) == sorted([f"a{i}" for i in range(10)] + [f"b{i}" for i in range(5)])
    files = open_store(lake).list_files("events/")
    assert {f.path.split("/")[1] for f in files} == {"date=2026-11-01", "date=2026-11-02"}
    assert all(f.path.split("/")[2].startswith("pod-0-") for f in files)
    assert not (tmp_path / "s3:").exists()  # nothing went to a local folder named after the URL
    assert not open_store(lake).list_files("_probe/", suffix="")  # the start-up probe cleaned up


def test_an_unusable_bucket_is_refused_at_start(s3_env: S3Server, tmp_path: Path) -> None:
    writer = LakeWriter("s3://no-such-bucket-here/lake", "events", wal_dir=tmp_path / "wal")
    with pytest.raises(LakeStoreError, match="cannot write to the lake"):
        writer.start_sync()
    with pytest.raises(RuntimeError, match="not running"):
        writer.append_sync(_events("x", 1))
    # The server refuses to start with the reason, rather than acknowledging into a log it cannot publish.
    serve = [sys.executable, "-m", "twofold", "serve-assignment", "--flags", str(ROOT / "examples" / "flags")]
    out = subprocess.run([*serve, "--lake", "s3://no-such-bucket-here/lake", "--wal-dir", str(tmp_path / "wal"),
                          "--port", "0", "--metrics-port", "-1", "--host", "127.0.0.1", "--materializations", "memory"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "cannot write to the lake 's3://no-such-bucket-here/lake'" in out.stderr
    out = subprocess.run([*serve, "--lake", f"s3://{s3_env.new_bucket()}/lake", "--port", "0", "--metrics-port", "-1",
                          "--host", "127.0.0.1", "--materializations", "memory"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2 and "--wal-dir" in out.stderr
    assert not (tmp_path / "s3:").exists()


def _start(tmp: Path, lake: str, name: str) -> tuple[subprocess.Popen, int]:
    ready = tmp / f"{name}.ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "twofold", "serve-assignment", "--flags", str(ROOT / "examples" / "flags"),
         "--lake", lake, "--wal-dir", str(tmp / "wal"), "--writer-id", "assignment-0", "--materializations", "memory",
         "--port", "0", "--metrics-port", "-1", "--host", "127.0.0.1", "--ready-file", str(ready),
         "--log-format", "text", "--log-level", "warning"],
        cwd=ROOT, env={**os.environ, "TWOFOLD_TOKEN_KEY": base64.b64encode(b"k" * 32).decode()},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, wait_ready(proc, ready)["port"]


def test_a_sigkilled_server_on_s3_loses_nothing_and_knows_its_resends(s3_env: S3Server, tmp_path: Path) -> None:
    """A real assignment server writing to s3://, killed with acknowledged events in its local log,
    restarted with the same writer id: every acknowledged event is in the bucket exactly once and a
    resent batch is answered as duplicates."""
    lake = f"s3://{s3_env.new_bucket()}/lake"
    proc, port = _start(tmp_path, lake, "a")
    acknowledged: list[str] = []
    batches = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.FlagResolverServiceStub(channel)
            for b in range(15):
                events = [pb.Event(event_id=f"b{b}-{i}", unit=f"user-{i}", name="purchase", value=1.0)
                          for i in range(50)]
                stub.TrackEvents(pb.TrackEventsRequest(client_secret=DEFAULT_CLIENT_SECRET, events=events), timeout=10)
                acknowledged.extend(e.event_id for e in events)
                batches.append(events)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    proc2, port2 = _start(tmp_path, lake, "b")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port2}") as channel:
            stub = pb_grpc.FlagResolverServiceStub(channel)
            reply = stub.TrackEvents(pb.TrackEventsRequest(client_secret=DEFAULT_CLIENT_SECRET, events=batches[-1]),
                                     timeout=10)
            assert (reply.accepted, reply.duplicates) == (0, 50)
    finally:
        proc2.send_signal(signal.SIGTERM)
        proc2.wait(timeout=30)
    ids = list(iter_ids(lake, "events"))
    assert sorted(ids) == sorted(acknowledged)


def _copy_lake(local: Path, s3: S3Server) -> str:
    bucket = s3.new_bucket()
    pafs.copy_files(str(local), f"{bucket}/lake", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3.filesystem())
    return f"s3://{bucket}/lake"


def test_the_analysis_of_an_s3_lake_equals_the_local_one(s3_env: S3Server, tmp_path: Path) -> None:
    local = tmp_path / "lake"
    write_synthetic_lake(local, exposures=4_000, events=12_000, seed=5, chunk=1_000)
    remote = _copy_lake(local, s3_env)
    on_disk = analyze(EXPERIMENT, local, now=LATER)
    on_s3 = analyze(EXPERIMENT, remote, now=LATER)
    assert on_disk.error is None and on_s3.error is None
    assert on_s3.rows_scanned == on_disk.rows_scanned > 16_000

    # Identical up to the order of floating-point sums (DuckDB's parallel aggregation): relative 1e-12.
    _assert_close({k: v for k, v in on_s3.document.items() if k not in ("computed_at", "lake")},
                  {k: v for k, v in on_disk.document.items() if k not in ("computed_at", "lake")}, "document")


def _assert_close(a: object, b: object, where: str) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-15, nan_ok=True), where
    else:
        assert a == b, where


def test_bandit_training_reads_the_same_decisions_from_s3(s3_env: S3Server, tmp_path: Path) -> None:
    from model_server.lake_training import load_decisions

    local = tmp_path / "lake"
    t0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    with LakeWriter(local, "decisions", writer_id="m-0") as decisions, LakeWriter(local, "events",
                                                                                  writer_id="a-0") as events:
        decisions.append_sync([{"decision_id": f"d{i}", "ts": t0 + dt.timedelta(minutes=i), "unit": f"u{i}",
                                "model": "home", "model_version": "1", "arm": "a" if i % 2 else "b",
                                "propensity": 0.5, "features": [float(i), 1.0]} for i in range(40)])
        events.append_sync([{"event_id": f"e{i}", "ts": t0 + dt.timedelta(minutes=i, seconds=30), "unit": f"u{i}",
                             "name": "purchase", "value": 2.0, "properties": "{}"} for i in range(0, 40, 3)])
    remote = _copy_lake(local, s3_env)
    window = dt.timedelta(minutes=5)
    a = load_decisions(local, "home", "purchase", window, as_of=LATER)
    b = load_decisions(remote, "home", "purchase", window, as_of=LATER)
    assert a.decision_ids == b.decision_ids and len(a) == 40
    assert (a.rewards == b.rewards).all() and a.rewards.sum() == 14
    assert (a.features == b.features).all()
