"""The lake path: experiment YAML, the metric SQL on real Parquet, its dialects, bad input, the CLI."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlglot
import yaml

from analysis_worker.analyze import analyze
from analysis_worker.compute import compute_results
from analysis_worker.config import ConfigError, load_experiment, parse_experiment
from analysis_worker.inputs import parse_input
from analysis_worker.lake import open_lake
from analysis_worker.sql import MULTIPLE, UNKNOWN, build_query, ranked_percentiles, stat_columns, transpile
from analysis_worker.synthetic import write_synthetic_lake
from bench.analysis import pandas_statistics
from twofold.lake import LakeWriter

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "tests" / "data" / "home-ranking-analysis.yaml"  # a fixed experiment of these tests
T0 = dt.datetime(2026, 11, 3, 12, 0, tzinfo=dt.UTC)
LATER = dt.datetime(2026, 12, 15, tzinfo=dt.UTC)


def _example(**changes: Any) -> dict[str, Any]:
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw.update(changes)
    return raw


def _query_rows(lake: Path, config: Any) -> list[dict[str, Any]]:
    tables = open_lake(lake)
    try:
        cursor = tables.connection.execute(build_query(config))
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]
    finally:
        tables.connection.close()


@pytest.fixture(scope="module")
def synthetic_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lake")
    write_synthetic_lake(root, exposures=40_000, events=120_000, seed=11, chunk=50_000)
    return root


def test_example_definition_is_complete_and_valid() -> None:
    config = load_experiment(EXAMPLE)
    assert config.flag == "home-ranking" and config.control == "control"
    assert {m.kind for m in config.metrics} == {"binary", "mean", "ratio"}
    assert {m.role for m in config.metrics} == {"success", "guardrail"}
    assert any(m.cap is not None for m in config.metrics)
    assert any(m.cuped_window_seconds for m in config.metrics)
    assert config.sequential is not None and config.sequential.method == "group-sequential"
    # Full Confidence variant names are accepted in the definition too.
    full = parse_experiment(_example(variants=["flags/home-ranking/variants/control",
                                               "flags/home-ranking/variants/bandit"]))
    assert list(full.split) == ["control", "bandit"]


def test_sql_statistics_equal_an_independent_pandas_computation(synthetic_lake: Path) -> None:
    config = load_experiment(EXAMPLE)
    sql_rows = _query_rows(synthetic_lake, config)
    pandas_rows = pandas_statistics(synthetic_lake, config)
    key = lambda r: (r["variant"], r["day"] or dt.date.min)  # noqa: E731
    sql_rows.sort(key=key)
    pandas_rows.sort(key=key)
    assert [key(r) for r in sql_rows] == [key(r) for r in pandas_rows]
    columns = stat_columns(config)
    for a, b in zip(sql_rows, pandas_rows, strict=True):
        assert a["n"] == b["n"]
        if a["variant"] in (MULTIPLE, UNKNOWN):
            continue
        np.testing.assert_allclose([a[c] for c in columns], [b[c] for c in columns], rtol=1e-9)
    # The data has deliberate duplicates and cross-over units: the exclusions are real.
    excluded = {r["variant"]: r["n"] for r in sql_rows if r["variant"] in (MULTIPLE, UNKNOWN)}
    assert excluded.get(MULTIPLE, 0) > 0


def test_analysis_of_the_synthetic_lake_finds_the_planted_effect(synthetic_lake: Path) -> None:
    result = analyze(EXAMPLE, synthetic_lake, now=LATER)
    doc = result.document
    assert result.error is None and "error" not in doc
    for field in ("experiment", "computed_at", "units", "srm", "metrics", "decision"):
        assert field in doc
    assert doc["srm"]["mismatch"] is False
    assert set(doc["srm"]) >= {"p_value", "observed", "expected", "mismatch"}
    comparison_fields = {"variant", "baseline", "diff", "ci_lower", "ci_upper", "p_value", "relative_diff",
                         "relative_ci_lower", "relative_ci_upper", "method", "significant"}
    for metric in doc["metrics"]:
        assert {"metric", "kind", "role", "variants", "comparisons"} <= set(metric)
        assert comparison_fields <= set(metric["comparisons"][0])
    clicks = next(m for m in doc["metrics"] if m["metric"] == "clicks_per_session")
    assert clicks["comparisons"][0]["relative_diff"] > 0  # treatment units click 3% more
    revenue = next(m for m in doc["metrics"] if m["metric"] == "revenue")
    assert revenue["cuped"]["theta"] is not None
    assert len(doc["look_dates"]) == len(revenue["cumulative"]) == 28
    assert doc["sequential"]["method"] == "group-sequential"
    assert doc["decision"]["recommendation"] in ("ship", "no-ship", "keep-running")
    assert result.rows_scanned > 160_000
    assert "<svg" in result.html and "Recommendation" in result.html


def _write(root: Path, table: str, records: list[dict[str, Any]]) -> None:
    writer = LakeWriter(root, table)
    writer.start_sync()
    try:
        writer.append_sync(records)
        writer.flush_sync()
    finally:
        writer.close_sync()


def _exposure(i: str, unit: str, variant: str, at: dt.datetime, flag: str = "home-ranking",
              rule: str = "home-ranking-experiment") -> dict[str, Any]:
    return {"exposure_id": i, "ts": at, "unit": unit, "flag": flag, "rule": rule,
            "variant": variant, "assignment_id": "a", "resolve_id": "r", "client": "test"}


def _event(i: str, unit: str, name: str, at: dt.datetime, value: float | None = None) -> dict[str, Any]:
    return {"event_id": i, "ts": at, "unit": unit, "name": name, "value": value, "properties": "{}"}


@pytest.fixture
def crafted_lake(tmp_path: Path) -> Path:
    """A handful of units whose statistics can be worked out by hand, written by the real lake writer."""
    root = tmp_path / "lake"
    h = dt.timedelta(hours=1)
    d = dt.timedelta(days=1)
    _write(root, "exposures", [
        _exposure("x1", "u1", "flags/home-ranking/variants/control", T0),
        _exposure("x1", "u1", "flags/home-ranking/variants/control", T0),           # retried write
        _exposure("x2", "u1", "control", T0 + h),                                    # short name, later
        # Spelled as the assignment server writes it: Confidence resource names throughout.
        _exposure("x3", "u2", "flags/home-ranking/variants/bandit", T0 + 2 * h, flag="flags/home-ranking",
                  rule="flags/home-ranking/rules/home-ranking-experiment"),
        _exposure("x4", "u3", "control", T0), _exposure("x5", "u3", "bandit", T0 + h),  # both arms: excluded
        _exposure("x6", "u4", "flags/home-ranking/variants/legacy", T0),            # unknown variant
        _exposure("x7", "u5", "control", T0, flag="other-flag"),                     # another flag
        _exposure("x8", "u6", "control", T0 + d),
    ])
    _write(root, "events", [
        _event("e1", "u1", "purchase", T0 + d, 10.0),
        _event("e1", "u1", "purchase", T0 + d, 10.0),             # retried: counts once
        _event("e2", "u1", "purchase", T0 + 8 * d, 5.0),          # after the 7-day window
        _event("e3", "u1", "purchase", T0 - 2 * d, 7.0),          # before exposure: the CUPED covariate
        _event("e4", "u2", "purchase", T0 + 3 * h, 20.0),
        _event("e5", "u2", "purchase", T0 + 4 * h, 1000.0),
        _event("e6", "u3", "purchase", T0 + h, 50.0),             # excluded unit
        _event("e7", "u1", "click", T0 + h), _event("e8", "u1", "click", T0 + 2 * h),
        _event("e9", "u1", "session_start", T0 + h),
        _event("e10", "u2", "session_start", T0 + 3 * h),
        _event("e11", "u6", "purchase", T0 + d - h, 3.0),         # before u6's first exposure
    ])
    # Things a reader must never see: write-ahead segments and a half-written Parquet file.
    wal = root / "_wal" / "events" / "dead-writer"
    wal.mkdir(parents=True, exist_ok=True)
    (wal / "00000001.wal").write_bytes(b"\x00garbage")
    (root / "events" / "date=2026-11-03" / ".half-written.parquet.tmp").write_bytes(b"PAR1 not finished")
    return root


def test_crafted_lake_gives_the_hand_computed_statistics(crafted_lake: Path) -> None:
    config = parse_experiment(_example(sequential=None, end="2026-12-01", metrics=[
        {"name": "revenue", "kind": "mean", "event": "purchase", "aggregate": "sum", "window": "7d",
         "cuped": {"window": "14d"}},
        {"name": "purchases", "kind": "mean", "event": "purchase", "aggregate": "count", "window": "7d",
         "cap": {"value": 1}},
        {"name": "bought", "kind": "binary", "event": "purchase", "window": "7d"},
        {"name": "cps", "kind": "ratio", "numerator": {"event": "click"}, "denominator": {"event": "session_start"},
         "role": "guardrail", "nim": 0.1},
    ]))
    rows = _query_rows(crafted_lake, config)
    excluded = {r["variant"]: r["n"] for r in rows if r["variant"] in (MULTIPLE, UNKNOWN)}
    assert excluded == {MULTIPLE: 1, UNKNOWN: 1}
    data = {(r["variant"], r["day"]): r for r in rows if r["variant"] not in (MULTIPLE, UNKNOWN)}
    assert sorted(data) == [("bandit", dt.date(2026, 11, 3)), ("control", dt.date(2026, 11, 3)),
                            ("control", dt.date(2026, 11, 4))]
    u1 = data[("control", dt.date(2026, 11, 3))]
    assert u1["n"] == 1
    assert (u1["m0_sum"], u1["c0_sum"], u1["m0_c0_sum"]) == (10.0, 7.0, 70.0)  # deduped, windowed, covariate
    assert (u1["m1_sum"], u1["m2_sum"]) == (1.0, 1.0)
    assert (u1["m3_sum"], u1["d3_sum"], u1["m3_d3_sum"]) == (2.0, 1.0, 2.0)
    u2 = data[("bandit", dt.date(2026, 11, 3))]
    assert (u2["m0_sum"], u2["m0_sum_sq"]) == (1020.0, 1020.0**2)
    assert u2["m1_sum"] == 1.0  # 2 purchases capped at 1
    assert (u2["m3_sum"], u2["d3_sum"]) == (0.0, 1.0)
    u6 = data[("control", dt.date(2026, 11, 4))]
    assert (u6["m0_sum"], u6["c0_sum"]) == (0.0, 3.0)
    # The same through the whole analysis: units, exclusions, warnings, no crash on tiny samples.
    doc = analyze(config, crafted_lake, now=LATER).document
    assert doc["units"] == {"control": 2, "bandit": 1}
    assert doc["exclusions"] == {"multiple_variants": 1, "unknown_variant": 1, "exposures_null_unit": 0,
                                 "exposures_null_id": 0, "events_null_unit": 0, "events_null_id": 0}
    assert any("more than one variant" in w for w in doc["warnings"])
    assert any("at least 2 are needed" in w for w in doc["warnings"])


def test_an_event_id_counts_once_even_when_its_copies_differ(tmp_path: Path) -> None:
    root = tmp_path / "lake"
    h = dt.timedelta(hours=1)
    _write(root, "exposures", [_exposure("x1", "u1", "control", T0), _exposure("x2", "u2", "bandit", T0)])
    _write(root, "events", [
        _event("e1", "u1", "purchase", T0 + h, 10.0),
        _event("e1", "u1", "purchase", T0 + 2 * h, 10.0),                   # a retry stamped later
        _event("e2", "u1", "purchase", T0 + 3 * h, 4.0),
        _event("e2", "u1", "purchase", T0 + dt.timedelta(days=9), 4.0),     # a copy outside the window
        _event("e3", "u2", "purchase", T0 + dt.timedelta(days=9), 5.0),
        _event("e3", "u2", "purchase", T0 + dt.timedelta(days=10), 5.0),    # no copy inside: never counts
    ])
    config = parse_experiment(_example(sequential=None, end="2026-12-01", metrics=[
        {"name": "revenue", "kind": "mean", "event": "purchase", "aggregate": "sum", "window": "7d"},
        {"name": "purchases", "kind": "mean", "event": "purchase", "aggregate": "count", "window": "7d"},
    ]))
    rows = {r["variant"]: r for r in _query_rows(root, config)}
    assert (rows["control"]["m0_sum"], rows["control"]["m1_sum"]) == (14.0, 2.0)
    assert (rows["bandit"]["m0_sum"], rows["bandit"]["m1_sum"]) == (0.0, 0.0)


@pytest.mark.parametrize("dialect", ["spark", "bigquery", "trino"])
def test_generated_sql_parses_in_other_dialects(dialect: str) -> None:
    config = load_experiment(EXAMPLE)
    text = transpile(build_query(config), dialect)
    tree = sqlglot.parse_one(text, read=dialect)
    assert tree.find(sqlglot.exp.Union) is not None
    assert "read_parquet" not in text.lower()
    # Neither Trino's ARBITRARY nor BigQuery's ANY_VALUE takes IGNORE NULLS (sqlglot would add it).
    assert "IGNORE NULLS" not in text
    # Partitions are pruned by `date`; no timestamp is cast to a date in the session's time zone.
    quoted_date = '"date"' if dialect == "trino" else "`date`"
    assert f"{quoted_date} >= CAST('2026-10-31' AS DATE)" in text
    assert "CAST(u.first_ts AS DATE)" not in text and "UNIX" in text
    assert "APPROX" not in text.upper()
    if dialect == "spark":
        assert "PERCENTILE(m1, 0.99)" in text and "UNIX_MICROS(u.first_ts)" in text
        # Spark adds an interval's days in the session time zone: windows are integer microseconds.
        assert "INTERVAL" not in text
    if dialect == "bigquery":
        # An analytic function there: one value repeated on every row, of which the caps keep one.
        assert "PERCENTILE_CONT(m1, 0.99) OVER ()" in text and "LIMIT 1" in text
        assert "UNIX_MICROS(u.first_ts)" in text
    if dialect == "trino":
        # No exact percentile function there: the caps come from ranks (checked on DuckDB below).
        assert "ARBITRARY(unit)" in text and "PERCENTILE" not in text
        assert "ROW_NUMBER() OVER (ORDER BY m1)" in text and "ROW_NUMBER() OVER (ORDER BY c1)" in text


@pytest.mark.parametrize("size, level", [(1, 0.99), (2, 0.5), (7, 0.5), (101, 0.99), (1000, 0.995), (50, 1.0)])
def test_trinos_ranked_percentile_is_numpys(size: int, level: float) -> None:
    import duckdb

    values = np.random.default_rng(size).lognormal(3.0, 1.0, size=size).round(2)  # ties too
    con = duckdb.connect()
    con.execute("CREATE TABLE per_unit (variant VARCHAR, m1 DOUBLE)")
    con.executemany("INSERT INTO per_unit VALUES (?, ?)", [("control", float(v)) for v in values] +
                    [(MULTIPLE, 1e9)])
    select = sqlglot.parse_one(f"SELECT QUANTILE_CONT(m1, {level}) AS cap_m1 FROM per_unit "
                               f"WHERE NOT variant IN ('{MULTIPLE}')", read="duckdb")
    (ranked,) = con.execute(ranked_percentiles(select).sql("duckdb")).fetchone()
    assert ranked == pytest.approx(float(np.quantile(values, level)), rel=1e-12)


def test_transpiled_duckdb_sql_gives_the_same_rows(synthetic_lake: Path) -> None:
    config = load_experiment(EXAMPLE)
    roundtrip = transpile(build_query(config), "duckdb")
    tables = open_lake(synthetic_lake)
    try:
        original = sorted(tables.connection.execute(build_query(config)).fetchall(), key=str)
        again = sorted(tables.connection.execute(roundtrip).fetchall(), key=str)
    finally:
        tables.connection.close()
    assert [r[:3] for r in original] == [r[:3] for r in again]
    # Parallel sums may add in another order: equal to rounding.
    np.testing.assert_allclose(np.array([r[3:] for r in original], dtype=float),
                               np.array([r[3:] for r in again], dtype=float), rtol=1e-12)


# ---------------------------------------------------------------- bad input (issue point 7)

def test_missing_lake_folder(tmp_path: Path) -> None:
    result = analyze(EXAMPLE, tmp_path / "nowhere")
    assert result.error is not None and "does not exist" in result.error
    assert result.document["decision"]["recommendation"] == "keep-running"
    assert "nowhere" in result.html


def test_missing_exposures_table(tmp_path: Path) -> None:
    _write(tmp_path, "events", [_event("e1", "u1", "purchase", T0, 1.0)])
    result = analyze(EXAMPLE, tmp_path)
    assert result.error is not None and "no exposures table" in result.error


def test_missing_events_table_is_a_warning(tmp_path: Path) -> None:
    _write(tmp_path, "exposures", [_exposure(f"x{i}", f"u{i}", "control" if i % 2 else "bandit", T0)
                                   for i in range(40)])
    result = analyze(EXAMPLE, tmp_path, now=LATER)
    assert result.error is None
    assert any("no events table" in w for w in result.document["warnings"])
    assert any("no purchase events" in w for w in result.document["warnings"])
    assert all(c["p_value"] is None for m in result.document["metrics"] for c in m["comparisons"])


def test_a_corrupt_parquet_file_is_named_not_a_crash(crafted_lake: Path) -> None:
    (crafted_lake / "events" / "date=2026-11-05").mkdir(parents=True, exist_ok=True)
    (crafted_lake / "events" / "date=2026-11-05" / "broken.parquet").write_bytes(b"not parquet at all")
    result = analyze(EXAMPLE, crafted_lake)
    assert result.error is not None and "reading the lake failed" in result.error
    assert "broken.parquet" in result.error


def test_unknown_flag_names_the_flags_that_exist(crafted_lake: Path) -> None:
    result = analyze(_example(flag="no-such-flag"), crafted_lake)
    assert result.error is not None
    assert "no exposures of flag 'no-such-flag'" in result.error and "home-ranking" in result.error


def test_experiment_with_no_exposures_in_its_time_range(crafted_lake: Path) -> None:
    result = analyze(_example(start="2027-01-01", end="2027-02-01"), crafted_lake)
    assert result.error is not None and "no exposures of flag 'home-ranking'" in result.error


def test_metric_with_no_events_and_variant_with_no_units(crafted_lake: Path) -> None:
    raw = _example(sequential=None, variants=["control", "bandit", "ghost"], metrics=[
        {"name": "nothing", "kind": "mean", "event": "never-sent", "aggregate": "count"},
        {"name": "revenue", "kind": "mean", "event": "purchase", "aggregate": "sum"}])
    doc = analyze(raw, crafted_lake, now=LATER).document
    assert "error" not in doc
    assert doc["units"]["ghost"] == 0 and doc["srm"]["observed"]["ghost"] == 0
    assert doc["srm"]["p_value"] is not None  # three units are too few to call a mismatch
    assert any("no never-sent events" in w for w in doc["warnings"])
    assert any("'ghost' has 0 unit(s)" in w for w in doc["warnings"])
    assert doc["decision"]["recommendation"] == "no-ship"


@pytest.mark.parametrize("change, message", [
    ({"flag": None}, "flag"),
    ({"variants": ["control"]}, "at least two"),
    ({"control": "nobody"}, "control"),
    ({"start": "yesterday"}, "start"),
    ({"end": "2026-10-01"}, "end: must be after start"),
    ({"correction": "fdr"}, "correction"),
    ({"colour": "blue"}, "unknown field"),
    ({"variants": ["flags/other/variants/a", "control"]}, "does not belong to flag"),
    ({"metrics": [{"name": "x", "kind": "mean"}]}, "event"),
    ({"metrics": [{"name": "x", "event": "a", "window": "soon"}]}, "window"),
    ({"metrics": [{"name": "x", "event": "a", "nim": 0.1}]}, "only applies to guardrails"),
    ({"metrics": [{"name": "x", "kind": "ratio", "numerator": "a", "denominator": "b", "cuped": True}]}, "CUPED"),
    ({"metrics": [{"name": "x", "kind": "binary", "event": "a", "cap": {"value": 3}}]}, "cannot be capped"),
    ({"metrics": [{"name": "x", "event": "a"}, {"name": "x", "event": "b"}]}, "duplicate"),
    ({"sequential": {"method": "group-sequential"}}, "expected_units"),
])
def test_invalid_definitions_name_the_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_experiment(_example(**change))


# ---------------------------------------------------------------- the CLI, as a user runs it

def _twofold(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "twofold", *args], cwd=ROOT, capture_output=True, text=True,
                          input=stdin, timeout=120, check=False)


def test_cli_analyze_writes_document_and_report(synthetic_lake: Path, tmp_path: Path) -> None:
    out = _twofold("analyze", str(EXAMPLE), "--lake", str(synthetic_lake), "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "recommendation:" in out.stdout and "clicks_per_session" in out.stdout
    doc = json.loads((tmp_path / "home-ranking-bandit.json").read_text())
    assert doc["experiment"] == "home-ranking-bandit"
    report = (tmp_path / "home-ranking-bandit.html").read_text()
    assert report.count("<svg") >= 5 and "Sample ratio check" in report and "<script" not in report
    assert "http://" not in report and "https://" not in report  # self-contained


def test_cli_analyze_errors_are_one_line_not_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nflag: [unclosed\n")
    out = _twofold("analyze", str(bad), "--lake", str(tmp_path))
    assert out.returncode == 2 and "not valid YAML" in out.stderr and "Traceback" not in out.stderr
    out = _twofold("analyze", str(EXAMPLE), "--lake", str(tmp_path / "missing"), "--out", str(tmp_path))
    assert out.returncode == 1 and "does not exist" in out.stderr and "Traceback" not in out.stderr
    out = _twofold("analyze", str(EXAMPLE), "--sql", "spark")
    assert out.returncode == 0 and "PERCENTILE(m1, 0.99)" in out.stdout and "APPROX" not in out.stdout
    out = _twofold("analyze", str(EXAMPLE), "--sql", "trino")
    assert out.returncode == 0 and "ROW_NUMBER() OVER (ORDER BY m1)" in out.stdout
    out = _twofold("analyze", str(EXAMPLE), "--threads", "2", "--engine", "spark")
    assert out.returncode == 2 and "--spark-conf" in out.stderr and "Traceback" not in out.stderr


def test_cli_stats_prints_the_results_document() -> None:
    raw = {"alpha": 0.05, "power": 0.8, "correction": "risk-aware", "control": "control",
           "expected_split": {"control": 0.5, "treatment": 0.5}, "sequential": None,
           "metrics": [{"name": "conversion", "kind": "binary", "role": "success", "direction": "increase",
                        "variants": {"control": {"n": 10000, "sum": 1000, "sum_sq": 1000},
                                     "treatment": {"n": 10000, "sum": 1150, "sum_sq": 1150}}}]}
    out = _twofold("stats", "-", stdin=json.dumps(raw))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    expected = compute_results(parse_input(raw))
    assert {k: v for k, v in doc.items() if k != "computed_at"} == \
        {k: v for k, v in expected.items() if k != "computed_at"}
    comparison = doc["metrics"][0]["comparisons"][0]
    assert comparison["significant"] is True and doc["decision"]["recommendation"] == "ship"
    bad = _twofold("stats", "-", stdin=json.dumps({**raw, "correction": "magic"}))
    assert bad.returncode == 2 and "correction" in bad.stderr and "Traceback" not in bad.stderr
    bad = _twofold("stats", "-", stdin="{not json")
    assert bad.returncode == 2 and "not valid JSON" in bad.stderr


def test_duckdb_runs_one_thread_more_than_its_default_unless_told(tmp_path: Path) -> None:
    import duckdb

    cores = duckdb.connect().execute("SELECT current_setting('threads')").fetchone()[0]
    tables = open_lake(tmp_path)
    told = open_lake(tmp_path, threads=1)
    try:
        assert tables.connection.execute("SELECT current_setting('threads')").fetchone()[0] == cores + 1
        assert told.connection.execute("SELECT current_setting('threads')").fetchone()[0] == 1
    finally:
        tables.connection.close()
        told.connection.close()


def test_rows_with_a_null_unit_or_id_are_excluded_and_counted(crafted_lake: Path) -> None:
    """Contract 3: a lake written by another tool may hold NULL units and ids. Such rows are
    excluded and counted in `exclusions`, never merged: before, NULL-unit exposures made one
    phantom control unit and NULL-id events were merged into one event."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    config = parse_experiment(_example(sequential=None, end="2026-12-01", metrics=[
        {"name": "revenue", "kind": "mean", "event": "purchase", "aggregate": "sum", "window": "7d"},
        {"name": "purchases", "kind": "mean", "event": "purchase", "aggregate": "count", "window": "7d"}]))
    before = analyze(config, crafted_lake, now=LATER).document
    ts = pa.timestamp("us", tz="UTC")
    exposures = pa.table({
        "exposure_id": pa.array(["o1", "o2", None], pa.string()),
        "ts": pa.array([T0, T0 + dt.timedelta(hours=1), T0], ts),
        "unit": pa.array([None, None, "u7"], pa.string()),
        "flag": ["home-ranking"] * 3, "rule": ["home-ranking-experiment"] * 3,
        "variant": ["control", "control", "bandit"], "assignment_id": ["a"] * 3, "resolve_id": ["r"] * 3,
        "client": ["other-tool"] * 3})
    events = pa.table({
        "event_id": pa.array([None, None, None, "o4"], pa.string()),
        "ts": pa.array([T0 + dt.timedelta(hours=5)] * 4, ts),
        "unit": pa.array(["u2", "u2", "u1", None], pa.string()),
        "name": ["purchase"] * 4, "value": pa.array([7.0, 9.0, 4.0, 2.0]), "properties": ["{}"] * 4})
    for table, data in (("exposures", exposures), ("events", events)):
        folder = crafted_lake / table / "date=2026-11-03"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(data, folder / "written-by-another-tool.parquet")
    after = analyze(config, crafted_lake, now=LATER).document
    assert after["units"] == before["units"] == {"control": 2, "bandit": 1}
    assert after["exclusions"] == {**before["exclusions"], "exposures_null_unit": 2, "exposures_null_id": 1,
                                   "events_null_unit": 1, "events_null_id": 3}
    # Nothing those rows carried reached a statistic.
    assert [m["variants"] for m in after["metrics"]] == [m["variants"] for m in before["metrics"]]
    assert "2 exposure(s) without a unit were excluded (contract 3: never merged into another)" in after["warnings"]
    assert "3 event(s) without an event_id were excluded (contract 3: never merged into another)" in after["warnings"]
