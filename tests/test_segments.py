"""Breakdowns by segment, end to end: a flag declares dimensions, the assignment server records them
with each exposure, the analysis reports every metric per segment, and older files without the
column still read."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from google.protobuf import timestamp_pb2

from analysis_worker.analyze import analyze
from analysis_worker.config import ConfigError, load_experiment
from analysis_worker.segments import MISSING
from analysis_worker.synthetic import write_synthetic_lake
from assignment_server.authoring.compiler import compile_folder
from assignment_server.authoring.errors import FlagFileError
from protos.twofold.assignment.v1 import assignment_pb2 as pb
from tests.test_assignment_server import EXAMPLE, SECRET, Harness
from twofold.lake import read_table
from twofold.testing import BackgroundLoop

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "tests" / "data" / "home-ranking-analysis.yaml"  # matches the synthetic lake
LATER = dt.datetime(2026, 12, 31, tzinfo=dt.UTC)


def _flags_with_dimensions(tmp: Path, dims: str = "[platform, device.country]") -> Path:
    flags = tmp / "flags"
    shutil.copytree(EXAMPLE, flags)
    path = flags / "home-ranking.yaml"
    path.write_text(path.read_text().replace("flag: home-ranking\n", f"flag: home-ranking\ndimensions: {dims}\n", 1))
    return flags


@pytest.fixture
def harness(bg_loop: BackgroundLoop, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(bg_loop, tmp_path, _flags_with_dimensions(tmp_path))
    try:
        yield h
    finally:
        h.close()


def test_a_flag_declares_dimensions_and_a_bad_declaration_is_refused(tmp_path: Path) -> None:
    result = compile_folder(_flags_with_dimensions(tmp_path / "good"))
    assert result.state["flags"]["flags/home-ranking"]["dimensions"] == ["platform", "device.country"]
    with pytest.raises(FlagFileError) as err:
        compile_folder(_flags_with_dimensions(tmp_path / "bad", "platform"))
    assert any("dimensions" in p.message for p in err.value.problems)


def test_exposures_record_the_declared_context_attributes(harness: Harness) -> None:
    # Resolve with apply: the exposure is written at once, with the context's dimensions.
    harness.resolve("user-9", apply=True, device={"country": "SE", "model": "x"}, secret_note="not a dimension")
    # Resolve now, apply later: the dimensions travel in the resolve token.
    response = harness.resolve("user-7", device={"country": "US"})
    flag = response.resolved_flags[0]
    now = time.time()
    send = timestamp_pb2.Timestamp()
    send.FromNanoseconds(int(now * 1e9))
    harness.stub.ApplyFlags(pb.ApplyFlagsRequest(
        client_secret=SECRET, resolve_token=response.resolve_token, send_time=send,
        flags=[pb.AppliedFlag(flag=flag.flag, apply_time=send)]), timeout=10)
    harness.bg.run(harness.servicer.exposures.flush())  # type: ignore[attr-defined]
    rows = {r["unit"]: r for r in read_table(harness.lake, "exposures").to_pylist()}
    assert json.loads(rows["user-9"]["dimensions"]) == {"device.country": "SE", "platform": "web"}
    assert json.loads(rows["user-7"]["dimensions"]) == {"device.country": "US", "platform": "web"}


def test_experiment_dimensions_are_validated() -> None:
    raw = yaml.safe_load(EXPERIMENT.read_text())
    assert load_experiment({**raw, "dimensions": ["country"]}).dimensions == ("country",)
    for bad in ("country", ["country", "country"], [""], [3]):
        with pytest.raises(ConfigError, match="dimensions"):
            load_experiment({**raw, "dimensions": bad})


@pytest.fixture(scope="module")
def segmented_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("segments")
    write_synthetic_lake(root, exposures=12_000, events=36_000, days=6, seed=4, chunk=100_000,
                         dimensions={"country": ("SE", "US", "DE", "BR", "JP", "IN", "FR", "NG")})
    # The first day's file as a writer before the column existed would have left it.
    first = sorted((root / "exposures").glob("date=*/*.parquet"))[0]
    table = pq.read_table(first)
    pq.write_table(table.drop_columns(["dimensions"]), first)
    return root


def _expected_units(lake: Path) -> tuple[pd.Series, pd.Series]:
    """Units per (first-exposure country, variant) among analysed units, and exposed units per country,
    computed with pandas from the Parquet files."""
    frames = [pq.read_table(p).to_pandas() for p in sorted((lake / "exposures").glob("date=*/*.parquet"))]
    df = pd.concat(frames, ignore_index=True)
    if "dimensions" not in df:
        df["dimensions"] = None
    df["variant"] = df["variant"].str.rsplit("/", n=1).str[-1]
    df["country"] = df["dimensions"].map(lambda d: json.loads(d)["country"] if isinstance(d, str) else MISSING)
    df = df.sort_values("ts")
    per_unit = df.groupby("unit").agg(first_country=("country", "first"), variants=("variant", "nunique"),
                                      variant=("variant", "first"))
    exposed = per_unit.groupby("first_country").size()
    per_unit = per_unit[per_unit["variants"] == 1]
    return per_unit.groupby(["first_country", "variant"]).size(), exposed


def test_every_metric_is_reported_per_segment_with_a_multiple_testing_note(segmented_lake: Path) -> None:
    raw = yaml.safe_load(EXPERIMENT.read_text())
    result = analyze({**raw, "dimensions": ["country"]}, segmented_lake, now=LATER)
    assert result.error is None
    segments = result.document["segments"]
    (country,) = segments["dimensions"]
    expected, exposed = _expected_units(segmented_lake)
    shown = [v["value"] for v in country["values"]]
    # The largest segments only (9 values: 8 countries and the old file's units without the column).
    assert len(shown) == segments["max_segments"] == 6 and country["other_values"] == 3
    sizes = {c: int(expected[c].sum()) for c in expected.index.get_level_values(0).unique()}
    assert sorted(sizes.values(), reverse=True)[:6] == sorted((sizes[c] for c in shown), reverse=True)
    for value in country["values"]:
        for variant, n in value["units"].items():
            assert n == expected[(value["value"], variant)], (value["value"], variant)
        for metric in raw["metrics"]:
            (comparison,) = value["metrics"][metric["name"]]
            assert comparison["relative_ci_lower"] <= comparison["relative_diff"] <= comparison["relative_ci_upper"]
    # Exposed units of the segments not shown (those exposed to several variants included).
    assert country["other_units"] == int(exposed.sum()) - sum(int(exposed[c]) for c in shown)
    assert "by chance" in segments["note"]
    assert "relative effect by country" in result.html and "Segments" in result.html


def test_a_lake_written_before_the_column_reads_and_says_why_there_are_no_segments(tmp_path: Path) -> None:
    write_synthetic_lake(tmp_path, exposures=2000, events=4000, days=2, seed=2, chunk=100_000)
    for path in (tmp_path / "exposures").glob("date=*/*.parquet"):
        pq.write_table(pq.read_table(path).drop_columns(["dimensions"]), path)
    raw = yaml.safe_load(EXPERIMENT.read_text())
    result = analyze({**raw, "dimensions": ["country"]}, tmp_path, now=LATER)
    assert result.error is None and result.document["units"]["control"] > 0
    assert "records dimensions" in result.document["segments"]["error"]
    plain = analyze(raw, tmp_path, now=LATER)
    assert plain.document["units"] == result.document["units"] and "segments" not in plain.document
