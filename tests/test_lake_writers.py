"""Many writers of one table, each owning its log by a stable writer id: concurrent starts, crashes,
restarts that recover their own log, and retries recognised across a restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from twofold.lake import LakeWriter, iter_ids

ROOT = Path(__file__).resolve().parent.parent

# Starts at a given instant (so the starts really overlap), acknowledges batches, then either closes
# or dies without closing (os._exit: its log stays behind, like after a SIGKILL).
_STARTER = """
import json, os, sys, time
from twofold.lake import LakeWriter
root, writer_id, at, crash = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4] == "crash"
time.sleep(max(0.0, at - time.time()))
w = LakeWriter(root, "events", writer_id=writer_id, compact_interval_s=0.05)
w.start_sync()
for b in range(3):
    w.append_sync([{"event_id": f"{writer_id}-{os.getpid()}-{b}-{i}", "ts": 1_790_000_000_000_000, "unit": "u",
                    "name": "n", "value": 1.0, "properties": "{}"} for i in range(10)])
    print(json.dumps([f"{writer_id}-{os.getpid()}-{b}-{i}" for i in range(10)]), flush=True)
if crash:
    os._exit(0)
w.close_sync()
"""


def _run_starters(root: Path, ids: list[str], crash: set[str]) -> list[str]:
    at = time.time() + 3.0  # imports take a while under load: every process waits for the same instant
    procs = [subprocess.Popen([sys.executable, "-c", _STARTER, str(root), writer_id, str(at),
                               "crash" if writer_id in crash else "close"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for writer_id in ids]
    acknowledged: list[str] = []
    failures = []
    for writer_id, proc in zip(ids, procs, strict=True):
        out, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            failures.append(f"{writer_id}: exit {proc.returncode}: {err.strip().splitlines()[-1:]}")
        acknowledged.extend(i for line in out.splitlines() for i in json.loads(line))
    assert not failures, failures
    return acknowledged


def test_concurrent_starts_of_many_writers_never_crash_and_lose_nothing(tmp_path: Path) -> None:
    """24 writers start at one instant, half of them die without closing, then all start again at
    once (the dead ones recover their own logs while the others start fresh). Before writer ids
    owned their logs, a writer's recovery removed a sibling's new directory and starts failed with
    FileNotFoundError."""
    ids = [f"pod-{k}" for k in range(24)]
    crash = set(ids[::2])
    acknowledged = _run_starters(tmp_path, ids, crash)
    acknowledged += _run_starters(tmp_path, ids, set())
    stored = list(iter_ids(tmp_path, "events"))
    assert len(stored) == len(set(stored)), "a record was published twice"
    assert set(stored) == set(acknowledged)
    assert len(acknowledged) == 2 * 24 * 30
    for writer_id in ids:  # every log is empty after its writer closed
        assert not list((tmp_path / "_wal" / "events" / writer_id).glob("*.wal"))


_KILLED = """
import sys, itertools
from twofold.lake import LakeWriter
w = LakeWriter(sys.argv[1], "events", writer_id=sys.argv[2], compact_interval_s=0.2)
w.start_sync()
for batch in itertools.count():
    w.append_sync([{"event_id": f"{sys.argv[2]}-b{batch}-{i}", "ts": 1_790_000_000_000_000, "unit": "u",
                    "name": "n", "value": 1.0, "properties": "{}"} for i in range(20)])
    print(batch, flush=True)
"""


def test_a_restarted_writer_recovers_its_own_log_and_only_it(tmp_path: Path) -> None:
    """SIGKILL two writers mid-stream; a third writer starting leaves their logs alone; each restarted
    id publishes its own leftovers. Zero acknowledged records lost, none duplicated."""
    procs = {wid: subprocess.Popen([sys.executable, "-c", _KILLED, str(tmp_path), wid], cwd=ROOT,
                                   stdout=subprocess.PIPE, text=True) for wid in ("pod-0", "pod-1")}
    acknowledged: dict[str, list[int]] = {wid: [] for wid in procs}
    deadline = time.monotonic() + 60
    for wid, proc in procs.items():
        assert proc.stdout is not None
        while len(acknowledged[wid]) < 60 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acknowledged[wid].append(int(line))
    for wid, proc in procs.items():
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.stdout is not None
        acknowledged[wid].extend(int(line) for line in proc.stdout.read().split())
        assert len(acknowledged[wid]) >= 60
    logs = {wid: sorted((tmp_path / "_wal" / "events" / wid).glob("*.wal")) for wid in procs}
    assert all(logs.values()), "each killed writer left its active segment"
    stranger = LakeWriter(tmp_path, "events", writer_id="pod-2")
    stranger.start_sync()
    stranger.close_sync()
    for wid, segments in logs.items():
        assert sorted((tmp_path / "_wal" / "events" / wid).glob("*.wal")) == segments  # untouched
    for wid in procs:
        again = LakeWriter(tmp_path, "events", writer_id=wid)
        again.start_sync()
        again.close_sync()
    stored = list(iter_ids(tmp_path, "events"))
    assert len(stored) == len(set(stored))
    present = set(stored)
    for wid, batches in acknowledged.items():
        for batch in batches:
            assert all(f"{wid}-b{batch}-{i}" in present for i in range(20)), f"{wid} batch {batch} lost"


def test_a_restarted_writer_knows_the_ids_it_stored_before(tmp_path: Path) -> None:
    """The ids of published segments and of recovered ones come back on start (oldest first), bounded
    by the capacity, so a server can answer a resend after a crash as duplicates."""
    first = LakeWriter(tmp_path, "events", writer_id="pod-0", compact_interval_s=60, recent_ids_capacity=25)
    first.start_sync()
    for b in range(4):  # four published segments of 10 ids
        first.append_sync([{"event_id": f"p{b}-{i}", "ts": 1, "unit": "u", "name": "n", "value": None,
                            "properties": "{}"} for i in range(10)])
        first.flush_sync()
    first.append_sync([{"event_id": f"unpublished-{i}", "ts": 1, "unit": "u", "name": "n", "value": None,
                        "properties": "{}"} for i in range(3)])
    # A crash: nothing closes, the lock goes with the process.
    first._closed = True
    assert first._lock_fd is not None
    os.close(first._lock_fd)
    again = LakeWriter(tmp_path, "events", writer_id="pod-0", recent_ids_capacity=25)
    again.start_sync()
    try:
        ids = again.recent_ids()
        # Capacity 25: the oldest segment (p0) was forgotten, p1..p3 and the recovered one remain.
        assert ids == [f"p{b}-{i}" for b in (1, 2, 3) for i in range(10)] + [f"unpublished-{i}" for i in range(3)]
        assert again.recent_ids() == []  # handed over once
    finally:
        again.close_sync()


def test_an_unusable_lake_url_is_refused_at_start(tmp_path: Path) -> None:
    """`s3:` without a local write-ahead directory, or an unknown scheme, fails before any append
    could be acknowledged into a folder literally named `s3:`."""
    from twofold.lakestore import LakeStoreError

    with pytest.raises(LakeStoreError, match="wal-dir"):
        LakeWriter("s3://bucket/lake", "events")
    with pytest.raises(LakeStoreError, match="cannot open lake URL"):
        LakeWriter("nosuch://bucket/lake", "events", wal_dir=tmp_path)
    assert not Path("s3:").exists()


def test_lake_recover_publishes_the_logs_of_writers_gone_and_leaves_live_ones(tmp_path: Path) -> None:
    """After a scale-down (or an upgrade from random writer ids) logs no pod will reclaim remain:
    `twofold lake recover` publishes them, skipping any id a live process holds."""
    gone = LakeWriter(tmp_path, "events", writer_id="pod-9", compact_interval_s=60)
    gone.start_sync()
    gone.append_sync([{"event_id": "orphan", "ts": 1, "unit": "u", "name": "n", "value": None, "properties": "{}"}])
    gone._closed = True
    assert gone._lock_fd is not None
    os.close(gone._lock_fd)  # died: the lock is free, the segment stays
    live = LakeWriter(tmp_path, "events", writer_id="pod-0", compact_interval_s=60)
    live.start_sync()
    try:
        live.append_sync([{"event_id": "live", "ts": 1, "unit": "u", "name": "n", "value": None, "properties": "{}"}])
        out = subprocess.run([sys.executable, "-m", "twofold", "lake", "recover", str(tmp_path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"recovered": {"events": ["pod-9"]}, "skipped_live": ["events/pod-0"]}
        assert list(iter_ids(tmp_path, "events")) == ["orphan"]
    finally:
        live.close_sync()
    assert sorted(iter_ids(tmp_path, "events")) == ["live", "orphan"]
