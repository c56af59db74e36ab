"""`twofold lake compact`: a partition's small files become one, readers between the two steps see
every row (twice, never none) and the analysis stays exact; a crash mid-way is finished by the next
run; the same on `s3://`."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from analysis_worker.analyze import analyze
from analysis_worker.synthetic import write_synthetic_lake
from tests.s3_server import S3Server
from twofold.lake import LakeWriter, iter_ids, read_table
from twofold.lake_compact import compact
from twofold.lakestore import open_store

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = ROOT / "tests" / "data" / "home-ranking-analysis.yaml"  # matches analysis_worker.synthetic
LATER = dt.datetime(2026, 12, 31, tzinfo=dt.UTC)


def _event(i: int, day: int) -> dict:
    return {"event_id": f"e{i}", "ts": dt.datetime(2026, 11, day, 12, tzinfo=dt.UTC) + dt.timedelta(seconds=i),
            "unit": f"u{i % 9}", "name": "purchase" if i % 2 else "click", "value": float(i), "properties": "{}"}


def _small_files(root: str | Path, batches: int = 30) -> list[str]:
    """`batches` flushes of one writer over two days: two small files per flush; each batch also
    repeats one id of the batch before (a retried append: a duplicate across files)."""
    ids = []
    with LakeWriter(root, "events", writer_id="pod-0", compact_interval_s=60,
                    **({"wal_dir": os.environ["I15_WAL"]} if "://" in str(root) else {})) as writer:
        for b in range(batches):
            records = [_event(b * 10 + i, day=1 + i % 2) for i in range(10)]
            if b:
                records.append(_event(b * 10 - 1, day=2))
            writer.append_sync(records)
            writer.flush_sync()
            ids += [r["event_id"] for r in records]
    return ids


def _parquet(root: Path) -> list[Path]:
    return sorted((root / "events").glob("date=*/*.parquet"))


def test_compaction_leaves_one_file_per_partition_with_every_row_once(tmp_path: Path) -> None:
    ids = _small_files(tmp_path)
    assert len(_parquet(tmp_path)) == 60
    assert len(list(iter_ids(tmp_path, "events"))) == len(ids)  # duplicates on disk before
    report = compact(tmp_path, ["events"], older_than=dt.timedelta(0))
    files = _parquet(tmp_path)
    assert [f.parent.name for f in files] == ["date=2026-11-01", "date=2026-11-02"]
    assert all(f.name.startswith("compacted-") for f in files)
    stored = list(iter_ids(tmp_path, "events"))
    assert sorted(stored) == sorted(set(ids))  # every id, once: retried duplicates merged away
    assert (report.files_in, report.files_out, report.rows_out) == (60, 2, len(set(ids)))
    group = pq.ParquetFile(files[0]).metadata.row_group(0)
    encodings = {group.column(i).path_in_schema: group.column(i).encodings for i in range(group.num_columns)}
    assert "RLE_DICTIONARY" in encodings["name"] and "RLE_DICTIONARY" not in encodings["event_id"]
    assert compact(tmp_path, ["events"], older_than=dt.timedelta(0)).files_in == 0  # nothing left to do
    assert not open_store(tmp_path).list_files("_compaction/", suffix=".json")


def test_recent_files_are_left_for_a_later_run(tmp_path: Path) -> None:
    _small_files(tmp_path, batches=4)
    assert compact(tmp_path, ["events"], older_than=dt.timedelta(hours=1)).files_in == 0
    later = time.time() + 2 * 3600
    assert compact(tmp_path, ["events"], older_than=dt.timedelta(hours=1), now=later).files_in == 8


def test_readers_between_publish_and_delete_see_both_copies_and_the_analysis_stays_exact(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    write_synthetic_lake(lake, exposures=3_000, events=9_000, seed=3, chunk=400)
    before_files = len(list((lake / "events").rglob("*.parquet")))
    assert before_files > 300
    before = analyze(EXPERIMENT, lake, now=LATER).document
    seen_between: list[dict] = []

    def between(output: str, inputs: list[str]) -> None:
        if seen_between:
            return
        # The merged file and its inputs are both visible now: rows twice, results unchanged.
        assert (lake / output).exists() and all((lake / p).exists() for p in inputs)
        seen_between.append(analyze(EXPERIMENT, lake, now=LATER).document)

    compact(lake, older_than=dt.timedelta(0), after_publish=between)
    after = analyze(EXPERIMENT, lake, now=LATER).document
    assert len(list((lake / "events").rglob("*.parquet"))) < before_files / 10
    for doc in (seen_between[0], after):
        _assert_same_results(doc, before)


def _assert_same_results(doc: dict, reference: dict) -> None:
    """Same results; only the physical row count may differ (it counts copies, which readers drop)."""
    _close(doc, reference)


def _close(a: object, b: object) -> bool:
    """Equal up to the order of floating-point sums (relative 1e-12)."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys()
        return all(_close(a[k], b[k]) for k in a if k not in ("computed_at", "rows_scanned"))
    if isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b)
        return all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-15, nan_ok=True)
        return True
    assert a == b
    return True


def test_a_crash_between_publish_and_delete_is_finished_by_the_next_run(tmp_path: Path) -> None:
    ids = _small_files(tmp_path, batches=6)

    def crash(_output: str, _inputs: list[str]) -> None:
        raise KeyboardInterrupt  # the compactor dies after publishing, before deleting

    with pytest.raises(KeyboardInterrupt):
        compact(tmp_path, ["events"], older_than=dt.timedelta(0), after_publish=crash)
    assert sorted(set(iter_ids(tmp_path, "events"))) == sorted(set(ids))  # both copies, nothing lost
    assert len(open_store(tmp_path).list_files("_compaction/", suffix=".json")) == 1
    report = compact(tmp_path, ["events"], older_than=dt.timedelta(0))
    assert report.intents_finished == 1
    stored = list(iter_ids(tmp_path, "events"))
    assert sorted(stored) == sorted(set(ids))
    assert len(_parquet(tmp_path)) == 2


def test_compaction_on_s3_matches_the_local_lake(s3_env: S3Server, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("I15_WAL", str(tmp_path / "wal"))
    lake = f"s3://{s3_env.new_bucket()}/lake"
    ids = _small_files(lake, batches=8)
    local = tmp_path / "local"
    _small_files(local, batches=8)
    assert len(open_store(lake).list_files("events/")) == 16
    out = subprocess.run([sys.executable, "-m", "twofold", "lake", "compact", lake, "--older-than", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["files_out"] == 2
    compact(local, older_than=dt.timedelta(0))
    remote_files = open_store(lake).list_files("events/")
    assert [f.path.split("/")[1] for f in remote_files] == ["date=2026-11-01", "date=2026-11-02"]
    assert sorted(iter_ids(lake, "events")) == sorted(set(ids))
    assert read_table(lake, "events").sort_by("event_id").equals(read_table(local, "events").sort_by("event_id"))
    assert all(f.path.rsplit("/", 1)[1].startswith("compacted-") for f in remote_files)
