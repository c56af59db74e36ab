"""The shared lake writer: durability, exactly-once compaction, layout readable without our code."""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from twofold.lake import TABLE_SCHEMAS, LakeWriter, _Pending, iter_ids, read_frames, read_table

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def running_writer(root: Path) -> Iterator[LakeWriter]:
    """An events writer, started, and closed (compacting what it holds) when the block ends."""
    writer = LakeWriter(root, "events", compact_interval_s=60)
    writer.start_sync()
    try:
        yield writer
    finally:
        writer.close_sync()


def _event(i: int, day: int = 1) -> dict:
    return {"event_id": f"e{i}", "ts": dt.datetime(2026, 11, day, 12, 0, tzinfo=dt.UTC) + dt.timedelta(seconds=i),
            "unit": f"u{i % 7}", "name": "purchase", "value": float(i) if i % 3 else None,
            "properties": json.dumps({"i": i})}


def test_append_flush_and_read_back_with_contract_schema(tmp_path: Path) -> None:
    with running_writer(tmp_path) as writer:
        writer.append_sync([_event(i, day=1) for i in range(10)])
        writer.append_sync([_event(i, day=2) for i in range(10, 15)])
        writer.flush_sync()
        files = sorted(p.relative_to(tmp_path).parts[:2] for p in tmp_path.glob("events/*/*.parquet"))
        assert {f[1] for f in files} == {"date=2026-11-01", "date=2026-11-02"}
        table = read_table(tmp_path, "events")
        assert table.schema == TABLE_SCHEMAS["events"]
        assert sorted(table["event_id"].to_pylist(), key=lambda x: int(x[1:])) == [f"e{i}" for i in range(15)]
        values = dict(zip(table["event_id"].to_pylist(), table["value"].to_pylist(), strict=True))
        assert values["e3"] is None and values["e4"] == 4.0
        stamps = dict(zip(table["event_id"].to_pylist(), table["ts"].to_pylist(), strict=True))
        assert stamps["e0"] == dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)
        # Nothing is left in the write-ahead log once flushed.
        assert not list(writer.wal_dir.glob("*.wal")) or all(
            not list(read_frames(p, TABLE_SCHEMAS["events"])) for p in writer.wal_dir.glob("*.wal"))


def test_duckdb_reads_the_hive_layout_without_our_code(tmp_path: Path) -> None:
    writer = LakeWriter(tmp_path, "exposures", compact_interval_s=60)
    writer.start_sync()
    rows = [{"exposure_id": f"x{i}", "ts": 1_790_000_000_000_000 + i, "unit": f"u{i}", "flag": "flags/f",
             "rule": "flags/f/rules/r", "variant": "flags/f/variants/" + ("a" if i % 2 else "b"),
             "assignment_id": "a", "resolve_id": "r", "client": "clients/c"} for i in range(100)]
    writer.append_sync(rows)
    writer.close_sync()
    pattern = str(tmp_path / "exposures" / "*" / "*.parquet")
    got = duckdb.sql(f"select date, variant, count(*) from read_parquet('{pattern}', hive_partitioning=true) "
                     "group by all order by variant").fetchall()
    assert [(str(d), v, n) for d, v, n in got] == [
        ("2026-09-21", "flags/f/variants/a", 50), ("2026-09-21", "flags/f/variants/b", 50)]


def test_concurrent_appends_share_fsyncs(tmp_path: Path) -> None:
    with running_writer(tmp_path) as writer:
        futures = []
        lock = threading.Lock()

        def produce(base: int) -> None:
            for i in range(50):
                fut = writer.append_nowait([_event(base + i)])
                with lock:
                    futures.append(fut)

        threads = [threading.Thread(target=produce, args=(k * 1000,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for fut in futures:
            fut.result(timeout=30)
        assert writer.appends_committed == 400
        assert writer.commits < 400  # group commit: several appends per fsync
        writer.flush_sync()
        assert read_table(tmp_path, "events").num_rows == 400


def test_invalid_records_fail_their_own_call_only(tmp_path: Path) -> None:
    with running_writer(tmp_path) as writer:
        with pytest.raises(ValueError, match="event_id and ts are required"):
            writer.append_sync([{"ts": 1}])
        with pytest.raises(ValueError, match="unknown columns"):
            writer.append_sync([{**_event(1), "color": "red"}])
        for bad in (float("nan"), float("inf"), float("-inf")):
            with pytest.raises(ValueError, match="value holds NaN or infinity"):
                writer.append_sync([{**_event(2), "value": bad}])
        # Wrong types are refused when the append is encoded, in the caller's own call: a record
        # that cannot become a Parquet row never reaches the segment the compactor must read.
        with pytest.raises(ValueError, match=r"invalid events record: .*dict"):
            writer.append_sync([{**_event(4), "properties": {"not": "a JSON string"}}])
        with pytest.raises(ValueError, match="invalid events record"):
            writer.append_sync([{**_event(5), "value": "twelve"}])
        writer.append_sync([_event(3)])
        writer.flush_sync()
        assert read_table(tmp_path, "events")["event_id"].to_pylist() == ["e3"]
    with pytest.raises(ValueError, match="unknown lake table"):
        LakeWriter(tmp_path, "nope")


def test_a_bad_append_in_a_group_commit_fails_alone(tmp_path: Path) -> None:
    """Appends that share a commit share one frame; a bad one is split out and fails by itself."""
    writer = LakeWriter(tmp_path, "events", compact_interval_s=60)
    writer.wal_dir.mkdir(parents=True)
    writer._open_segment()  # the commit path alone, without the writer thread

    def pending(records: list[dict]) -> _Pending:
        return _Pending(records, len(records), concurrent.futures.Future())

    good = [pending([_event(1), _event(2)]), pending([_event(3)])]
    bad = pending([{**_event(4), "value": float("inf")}])
    writer._commit([good[0], bad, good[1]])
    assert all(p.future.result(timeout=0) is None for p in good)
    with pytest.raises(ValueError, match="invalid events record: value holds NaN or infinity"):
        bad.future.result(timeout=0)
    writer._commit([pending([_event(5)]), pending([_event(6)])])
    assert writer.commits == 2
    frames = list(read_frames(writer._segment.path, TABLE_SCHEMAS["events"]))  # type: ignore[union-attr]
    assert [t["event_id"].to_pylist() for t in frames] == [["e1", "e2"], ["e3"], ["e5", "e6"]]


def test_float_lists_refuse_nan_and_keep_their_values(tmp_path: Path) -> None:
    writer = LakeWriter(tmp_path, "decisions", compact_interval_s=60)
    writer.start_sync()
    row = {"decision_id": "d1", "ts": 1_790_000_000_000_000, "unit": "u", "model": "m", "model_version": "1",
           "arm": "a", "propensity": 0.25, "features": [0.5, -1.25, 3.0]}
    try:
        with pytest.raises(ValueError, match="features holds NaN or infinity"):
            writer.append_sync([{**row, "decision_id": "d0", "features": [0.5, float("nan")]}])
        writer.append_sync([row])
        writer.flush_sync()
        table = read_table(tmp_path, "decisions")
        assert table.schema == TABLE_SCHEMAS["decisions"]
        assert table.to_pylist() == [{**row, "ts": dt.datetime(2026, 9, 21, 14, 13, 20, tzinfo=dt.UTC)}]
    finally:
        writer.close_sync()


def test_segments_in_the_former_json_frame_format_are_recovered(tmp_path: Path) -> None:
    """A server upgraded after a crash finds segments of JSON frames: they still reach the lake."""
    folder = tmp_path / "_wal" / "events" / "old-writer"
    folder.mkdir(parents=True)
    frames = b""
    for batch in ([_event(i) for i in range(3)], [_event(i) for i in range(3, 5)]):
        rows = [{**r, "ts": int(r["ts"].timestamp()) * 1_000_000} for r in batch]
        payload = json.dumps(rows, separators=(",", ":")).encode()
        frames += struct.pack("<II", len(payload), zlib.crc32(payload)) + payload
    (folder / "000000000001.wal").write_bytes(frames)
    writer = LakeWriter(tmp_path, "events", writer_id="old-writer")
    writer.start_sync()
    writer.close_sync()
    table = read_table(tmp_path, "events")
    assert sorted(table["event_id"].to_pylist()) == [f"e{i}" for i in range(5)]
    assert dict(zip(table["event_id"].to_pylist(), table["value"].to_pylist(), strict=True))["e4"] == 4.0
    assert not list(folder.glob("*.wal"))


def test_torn_tail_is_ignored_and_recompaction_is_idempotent(tmp_path: Path) -> None:
    writer = LakeWriter(tmp_path, "events", compact_interval_s=60, writer_id="dead-writer")
    writer.start_sync()
    writer.append_sync([_event(i) for i in range(5)])
    writer.append_sync([_event(i) for i in range(5, 8)])
    segment = next(writer.wal_dir.glob("*.wal"))
    saved = segment.read_bytes()
    # Simulate a crash: threads stop without compaction, the lock is released.
    writer._closed = True
    os.close(writer._lock_fd)  # type: ignore[arg-type]
    # A torn frame at the end: the crash happened mid-write of an unacknowledged append.
    with open(segment, "ab") as handle:
        handle.write(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"partial")
    recovering = LakeWriter(tmp_path, "events", compact_interval_s=60, writer_id="dead-writer")
    recovering.start_sync()
    recovering.close_sync()
    assert sorted(iter_ids(tmp_path, "events")) == sorted(f"e{i}" for i in range(8))
    # Crash after publishing Parquet but before deleting the segment: compacting again is harmless.
    segment.parent.mkdir(parents=True, exist_ok=True)
    segment.write_bytes(saved)
    again = LakeWriter(tmp_path, "events", compact_interval_s=60, writer_id="dead-writer")
    again.start_sync()
    again.close_sync()
    assert sorted(iter_ids(tmp_path, "events")) == sorted(f"e{i}" for i in range(8))


def test_a_writer_never_touches_another_writers_log_and_one_id_is_one_process(tmp_path: Path) -> None:
    """Each writer recovers only its own log: a live writer's segments stay put while another writer
    starts and stops, and a second process with the same writer id is refused (the local lock is only
    that guard; correctness needs no lock across nodes)."""
    live = LakeWriter(tmp_path, "events", compact_interval_s=60, writer_id="pod-0")
    live.start_sync()
    try:
        live.append_sync([_event(1)])
        other = LakeWriter(tmp_path, "events", compact_interval_s=60, writer_id="pod-1")
        other.start_sync()
        other.close_sync()
        assert list(live.wal_dir.glob("*.wal"))  # still there, still live's
        assert read_table(tmp_path, "events").num_rows == 0
        twin = LakeWriter(tmp_path, "events", writer_id="pod-0")
        with pytest.raises(RuntimeError, match="in use by another process"):
            twin.start_sync()
        live.flush_sync()
        assert read_table(tmp_path, "events").num_rows == 1
        (name,) = [p.name for p in (tmp_path / "events").glob("date=*/*.parquet")]
        assert name.startswith("pod-0-")  # published names carry the writer id
    finally:
        live.close_sync()


def test_a_bad_writer_id_is_refused() -> None:
    with pytest.raises(ValueError, match="writer id"):
        LakeWriter("unused", "events", writer_id="../escape")


_PRODUCER = """
import sys, itertools
from twofold.lake import LakeWriter
w = LakeWriter(sys.argv[1], "events", compact_interval_s=0.2)
w.start_sync()
for batch in itertools.count():
    records = [{"event_id": f"b{batch}-{i}", "ts": 1_790_000_000_000_000 + batch, "unit": "u", "name": "n",
                "value": 1.0, "properties": "{}"} for i in range(20)]
    w.append_sync(records)
    print(batch, flush=True)   # acknowledged
"""


def test_everything_acknowledged_survives_sigkill_exactly_once(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _PRODUCER, str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    acknowledged: list[int] = []
    deadline = time.monotonic() + 30
    assert proc.stdout is not None
    while len(acknowledged) < 150 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acknowledged.append(int(line))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    acknowledged.extend(int(line) for line in proc.stdout.read().split())
    assert len(acknowledged) >= 150
    # Some segments were compacted while it ran; the rest are in the dead writer's log.
    recovering = LakeWriter(tmp_path, "events")
    recovering.start_sync()
    recovering.close_sync()
    ids = list(iter_ids(tmp_path, "events"))
    assert len(ids) == len(set(ids)), "a record was written twice"
    present = set(ids)
    for batch in acknowledged:
        assert all(f"b{batch}-{i}" in present for i in range(20)), f"acknowledged batch {batch} lost"
    # Every Parquet file is complete and readable (files appear by rename only).
    for path in tmp_path.glob("events/*/*.parquet"):
        pq.read_metadata(path)
    assert not list(tmp_path.glob("events/*/.*.tmp"))


def test_a_failed_write_moves_to_a_new_segment_even_an_empty_one(tmp_path: Path) -> None:
    """A write error (here: the segment's descriptor closed under the writer) fails that append;
    the next one goes to a fresh segment. Before, an empty segment was kept after a failed write,
    so every later append failed on the same broken file."""
    with running_writer(tmp_path) as writer:
        broken = writer._segment
        assert broken is not None and broken.records == 0
        os.close(broken.fd)
        with pytest.raises(OSError):
            writer.append_sync([_event(1)])
        writer.append_sync([_event(2)])
        writer.flush_sync()
        assert sorted(iter_ids(tmp_path, "events")) == ["e2"]
        assert not broken.path.exists()  # the empty broken segment was dropped, not compacted
        assert writer._writer is not None and writer._writer.is_alive()


def test_the_writer_survives_a_vanished_write_ahead_directory(tmp_path: Path) -> None:
    """If the next segment cannot be opened (directory gone, disk full), appends fail with the
    error instead of waiting forever, and they succeed again once the disk is back."""
    import shutil

    with running_writer(tmp_path) as writer:
        writer.append_sync([_event(1)])
        shutil.rmtree(writer.wal_dir)  # e1's segment goes with it: an operator's mistake
        writer.flush_sync()  # rotation: compaction of e1 and the next segment's open both fail
        with pytest.raises(FileNotFoundError):
            writer.append_sync([_event(2)], timeout=10)
        writer.wal_dir.mkdir(parents=True)
        writer.append_sync([_event(3)], timeout=10)
        writer.flush_sync()
        assert sorted(iter_ids(tmp_path, "events")) == ["e3"]
        assert writer._writer is not None and writer._writer.is_alive()


def test_parquet_dictionary_encodes_only_the_repeating_columns(tmp_path: Path) -> None:
    with running_writer(tmp_path) as writer:
        writer.append_sync([_event(i) for i in range(50)])
        writer.flush_sync()
    (path,) = (tmp_path / "events").glob("date=*/*.parquet")
    group = pq.ParquetFile(path).metadata.row_group(0)
    encodings = {group.column(i).path_in_schema: group.column(i).encodings for i in range(group.num_columns)}
    assert "RLE_DICTIONARY" in encodings["name"]
    for column in ("event_id", "unit", "ts", "value"):
        assert "RLE_DICTIONARY" not in encodings[column] and "PLAIN" in encodings[column], column
