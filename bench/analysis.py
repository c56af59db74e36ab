"""Benchmark: the analysis of one experiment on a synthetic lake, DuckDB path against a pandas path.

    python -m bench.analysis                        # 10M exposures, 30M events (the issue's sizes)
    python -m bench.analysis --exposures 1000000 --events 3000000 --lake /tmp/lake-small
    python -m bench.analysis --lake /tmp/lake-small --engine spark --skip-pandas   # DuckDB beside Spark

Both paths compute the same sufficient statistics for the five metrics of
tests/data/home-ranking-analysis.yaml (binary, capped mean with CUPED, ratio, two guardrails) and
feed the same statistics engine. Each runs in its own child process, so wall time and peak memory
(the child's maximum resident set) are measured cleanly and side by side in one run; the
statistics of both are compared at the end (they must agree to 1e-9).

The pandas path is what a careful analyst would write: pyarrow reads of only the needed columns
with the filters pushed into the Parquet reader, strings kept in Arrow memory (`string[pyarrow]`),
drop_duplicates on event_id, a merge with each unit's first exposure, vectorised boolean masks per
metric and groupby sums.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import glob
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_EXPERIMENT = ROOT / "tests" / "data" / "home-ranking-analysis.yaml"  # matches analysis_worker.synthetic


# ---------------------------------------------------------------- the pandas implementation

def pandas_statistics(lake: str | os.PathLike[str], experiment: Any) -> list[dict[str, Any]]:
    """The rows of the metric SQL (variant, day, n, sums...), computed with pandas instead."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from analysis_worker.lake import table_pattern
    from analysis_worker.sql import MULTIPLE, UNKNOWN

    # Strings stay in Arrow memory (pandas' "string[pyarrow]", the default string type from pandas 3)
    # instead of becoming one Python object each: 1.8x faster end to end on the benchmark's lakes.
    arrow_strings = {pa.string(): pd.StringDtype("pyarrow"), pa.large_string(): pd.StringDtype("pyarrow")}

    def read(table: str, columns: list[str], filters: list[Any]) -> pd.DataFrame:
        files = sorted(glob.glob(table_pattern(lake, table)))
        if not files:
            return pd.DataFrame({c: pd.Series(dtype="object") for c in columns})
        dataset = pq.ParquetDataset(files, filters=filters)
        return dataset.read(columns=columns).to_pandas(types_mapper=arrow_strings.get)

    start = pd.Timestamp(experiment.start)
    end = pd.Timestamp(experiment.end) if experiment.end else None
    # Both spellings of the flag and rule, as the SQL matches them (see ExperimentConfig.flag_names).
    filters: list[Any] = [("flag", "in", list(experiment.flag_names())), ("ts", ">=", start)]
    if experiment.rule:
        filters.append(("rule", "in", list(experiment.rule_names())))
    if end is not None:
        filters.append(("ts", "<", end))
    exposed = read("exposures", ["unit", "ts", "variant"], filters)
    # Variants as small integers (-1 unknown), so the per-unit aggregation stays in pandas' C paths.
    short_names = list(experiment.split)
    codes = {full: short_names.index(short) for full, short in experiment.exposure_names().items()}
    exposed["variant"] = exposed["variant"].map(codes).fillna(-1).astype("int8")
    units = exposed.groupby("unit", sort=False).agg(first_ts=("ts", "min"), variant=("variant", "min"),
                                                    variant_count=("variant", "nunique"))
    del exposed
    excluded_multiple = int((units["variant_count"] > 1).sum())
    excluded_unknown = int(((units["variant_count"] == 1) & (units["variant"] == -1)).sum())
    assigned = units[(units["variant_count"] == 1) & (units["variant"] != -1)].drop(columns="variant_count")
    assigned["variant"] = np.asarray(short_names, dtype=object)[assigned["variant"].to_numpy()]
    del units

    names = sorted({e for m in experiment.metrics for e in m.event_names})
    longest_pre = max((m.cuped_window_seconds or 0 for m in experiment.metrics), default=0)
    event_filters: list[Any] = [("name", "in", names), ("ts", ">=", start - pd.Timedelta(seconds=longest_pre))]
    if end is not None:
        event_filters.append(("ts", "<", end))
    events = read("events", ["event_id", "unit", "name", "ts", "value"], event_filters)
    events = events.drop_duplicates("event_id").drop(columns="event_id")
    joined = events.merge(assigned[["first_ts"]], left_on="unit", right_index=True, how="inner")
    del events
    since = (joined["ts"] - joined["first_ts"]).to_numpy(dtype="timedelta64[us]").astype(np.int64)
    value = joined["value"].fillna(0.0).to_numpy()
    name = joined["name"].to_numpy()
    unit_codes, unit_index = pd.factorize(joined["unit"])
    per_unit = pd.DataFrame(index=unit_index)

    def window_values(events_of: tuple[str, ...], aggregate: str, lo_s: int, hi_s: int, binary: bool) -> pd.Series:
        mask = np.isin(name, list(events_of)) & (since >= lo_s * 1_000_000) & (since < hi_s * 1_000_000)
        weights = np.ones(mask.sum()) if binary or aggregate == "count" else value[mask]
        sums = np.bincount(unit_codes[mask], weights=weights, minlength=unit_index.size)
        return pd.Series(np.minimum(sums, 1.0) if binary else sums, index=unit_index)

    columns: dict[str, pd.Series] = {}
    for i, metric in enumerate(experiment.metrics):
        binary = metric.kind == "binary"
        columns[f"m{i}"] = window_values(metric.measure.events, metric.measure.aggregate, 0, metric.window_seconds,
                                         binary)
        if metric.denominator is not None:
            columns[f"d{i}"] = window_values(metric.denominator.events, metric.denominator.aggregate, 0,
                                             metric.window_seconds, False)
        if metric.cuped_window_seconds is not None:
            columns[f"c{i}"] = window_values(metric.measure.events, metric.measure.aggregate,
                                             -metric.cuped_window_seconds, 0, binary)
    per_unit = pd.DataFrame(columns)
    del joined
    frame = assigned.join(per_unit, how="left").fillna(dict.fromkeys(columns, 0.0))
    for i, metric in enumerate(experiment.metrics):
        if metric.cap is None:
            continue
        for col in [f"m{i}"] + ([f"c{i}"] if metric.cuped_window_seconds is not None else []):
            cap = metric.cap.value if metric.cap.value is not None else frame[col].quantile(metric.cap.percentile)
            frame[col] = np.minimum(frame[col], cap)
    frame["day"] = frame["first_ts"].dt.tz_convert("UTC").dt.date
    aggregations: dict[str, pd.Series] = {}
    for i, metric in enumerate(experiment.metrics):
        m = frame[f"m{i}"]
        aggregations[f"m{i}_sum"] = m
        aggregations[f"m{i}_sum_sq"] = m * m
        if metric.denominator is not None:
            d = frame[f"d{i}"]
            aggregations.update({f"d{i}_sum": d, f"d{i}_sum_sq": d * d, f"m{i}_d{i}_sum": m * d})
        if metric.cuped_window_seconds is not None:
            c = frame[f"c{i}"]
            aggregations.update({f"c{i}_sum": c, f"c{i}_sum_sq": c * c, f"m{i}_c{i}_sum": m * c})
    stats = pd.DataFrame(aggregations)
    stats["variant"], stats["day"], stats["n"] = frame["variant"], frame["day"], 1
    grouped = stats.groupby(["variant", "day"], sort=True).sum().reset_index()
    rows = grouped.to_dict("records")
    for label, count in ((MULTIPLE, excluded_multiple), (UNKNOWN, excluded_unknown)):
        if count:
            rows.append({"variant": label, "day": None, "n": count})
    return rows


def pandas_analyze(lake: str | os.PathLike[str], experiment_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The whole pandas path: statistics with pandas, then the same statistics engine."""
    from analysis_worker.analyze import stats_input_from_rows
    from analysis_worker.compute import compute_results
    from analysis_worker.config import load_experiment
    from analysis_worker.sql import MULTIPLE, UNKNOWN

    config = load_experiment(experiment_path)
    rows = pandas_statistics(lake, config)
    data = [r for r in rows if r["variant"] not in (MULTIPLE, UNKNOWN)]
    return compute_results(stats_input_from_rows(config, data))


# ---------------------------------------------------------------- the benchmark

def _peak_rss_mb(usage: resource.struct_rusage) -> float:
    """This process's peak resident memory since it started this program.

    Linux keeps `ru_maxrss` across exec, so a child forked from a parent that had just generated
    the lake (~4 GB resident) reported the parent's peak (4139 MB for a 2.3 GB run); VmHWM
    belongs to the current address space only.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return usage.ru_maxrss / 1024


def _process_usage(pid: int) -> tuple[float, float]:
    """CPU seconds and peak resident MB of another process of ours (Spark's JVM, which PySpark
    starts and never waits for, so it never shows in RUSAGE_CHILDREN)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    peak = next((int(line.split()[1]) / 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                 if line.startswith("VmHWM:")), 0.0)
    return cpu, peak


def _child(path: str, lake: str, experiment: str, memory_limit: str | None) -> None:
    started = time.perf_counter()
    startup = 0.0
    if path == "duckdb":
        from analysis_worker.analyze import analyze

        result = analyze(experiment, lake, memory_limit=memory_limit)
        document = result.document
        html_bytes = len(result.html)
    elif path == "spark":
        from analysis_worker.analyze import analyze
        from analysis_worker.engine import make_engine

        engine = make_engine("spark")
        _ = engine.session  # type: ignore[attr-defined]
        startup = time.perf_counter() - started
        started = time.perf_counter()
        result = analyze(experiment, lake, engine=engine)
        document = result.document
        html_bytes = len(result.html)
        elapsed = time.perf_counter() - started
        jvm = _process_usage(engine.session.sparkContext._gateway.proc.pid)  # type: ignore[attr-defined]
        engine.close()
    else:
        document = pandas_analyze(lake, experiment)
        html_bytes = 0
    if path != "spark":
        elapsed = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak_mb = _peak_rss_mb(usage)
    if path != "spark":
        jvm = (0.0, 0.0)
    summary = {m["metric"]: [(v["variant"], v["n"], v["mean"]) for v in m["variants"]] for m in document["metrics"]}
    print(json.dumps({"path": path, "seconds": elapsed, "peak_mb": peak_mb, "error": document.get("error"),
                      "cpu_seconds": usage.ru_utime + usage.ru_stime + jvm[0],
                      "startup_seconds": startup, "jvm_peak_mb": jvm[1],
                      "load": os.getloadavg()[0],
                      "summary": summary, "recommendation": document["decision"]["recommendation"],
                      "html_bytes": html_bytes}))


def _run_child(path: str, lake: str, experiment: str, memory_limit: str | None) -> dict[str, Any]:
    wall = time.perf_counter()
    extra = ["--memory-limit", memory_limit] if memory_limit else []
    out = subprocess.run([sys.executable, "-m", "bench.analysis", "--child", path, "--lake", lake,
                          "--experiment", experiment, *extra], cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{path} path failed:\n{out.stderr}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - wall
    return result


def _agreement(a: dict[str, Any], b: dict[str, Any]) -> float:
    worst = 0.0
    for metric, rows in a["summary"].items():
        for (_, n1, m1), (_, n2, m2) in zip(rows, b["summary"][metric], strict=True):
            if n1 != n2:
                return float("inf")
            if m1 is not None and m2 is not None and m1 != 0:
                worst = max(worst, abs(m1 - m2) / abs(m1))
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.analysis", description=__doc__.split("\n\n")[0])
    parser.add_argument("--exposures", type=int, default=10_000_000)
    parser.add_argument("--events", type=int, default=30_000_000)
    parser.add_argument("--lake", help="lake folder (generated if it has no exposures yet; default: a temp folder)")
    parser.add_argument("--experiment", default=str(DEFAULT_EXPERIMENT))
    parser.add_argument("--skip-pandas", action="store_true", help="only the DuckDB path (and Spark's, with --engine)")
    parser.add_argument("--engine", choices=["duckdb", "spark"], default="duckdb",
                        help="spark: also run the analysis on Spark (local[*], pip install 'twofold[spark]') "
                             "beside DuckDB in the same run")
    parser.add_argument("--memory-limit", default="2.5GB",
                        help="DuckDB memory limit (it spills beyond it); 'none' for DuckDB's default of 80%% of RAM")
    parser.add_argument("--child", choices=["duckdb", "pandas", "spark"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.lake, args.experiment, args.memory_limit)
        return 0
    limit = None if str(args.memory_limit).lower() == "none" else args.memory_limit

    from analysis_worker.synthetic import write_synthetic_lake

    temp = None
    lake = args.lake
    if lake is None:
        temp = tempfile.TemporaryDirectory(prefix="twofold-bench-lake-")
        lake = temp.name
    try:
        if not glob.glob(os.path.join(lake, "exposures", "date=*", "*.parquet")):
            t0 = time.perf_counter()
            info = write_synthetic_lake(lake, exposures=args.exposures, events=args.events,
                                        start=dt.date(2026, 11, 1), days=28)
            print(f"generated {info.exposures:,} exposures and {info.events:,} events "
                  f"(+1% duplicates) for {info.units:,} units in {time.perf_counter() - t0:.1f} s: {lake}")
        else:
            print(f"reusing the lake at {lake}")
        duck = _run_child("duckdb", lake, args.experiment, limit)
        print(f"duckdb: {duck['seconds']:.2f} s analysis ({duck['process_seconds']:.2f} s with interpreter start, "
              f"{duck['cpu_seconds']:.1f} s CPU), peak RSS {duck['peak_mb']:.0f} MB, "
              f"recommendation {duck['recommendation']}; machine load {duck['load']:.1f}")
        if duck["error"]:
            print(f"  error: {duck['error']}")
        if args.engine == "spark":
            spark = _run_child("spark", lake, args.experiment, None)
            print(f"spark:  {spark['seconds']:.2f} s analysis (+ {spark['startup_seconds']:.1f} s to start the "
                  f"session; {spark['process_seconds']:.2f} s with interpreter start, {spark['cpu_seconds']:.1f} s "
                  f"CPU), peak RSS {spark['peak_mb']:.0f} MB Python + {spark['jvm_peak_mb']:.0f} MB JVM, "
                  f"recommendation {spark['recommendation']}; machine load {spark['load']:.1f}")
            print(f"spark / duckdb: {spark['seconds'] / duck['seconds']:.1f}x the analysis time; largest relative "
                  f"difference of the means: {_agreement(duck, spark):.2e}")
        if args.skip_pandas:
            return 0
        pdres = _run_child("pandas", lake, args.experiment, None)
        print(f"pandas: {pdres['seconds']:.2f} s analysis ({pdres['process_seconds']:.2f} s with interpreter start, "
              f"{pdres['cpu_seconds']:.1f} s CPU), peak RSS {pdres['peak_mb']:.0f} MB; "
              f"machine load {pdres['load']:.1f}")
        print(f"speed-up duckdb vs pandas: {pdres['seconds'] / duck['seconds']:.1f}x; "
              f"memory ratio {pdres['peak_mb'] / duck['peak_mb']:.1f}x; "
              f"largest relative difference of the means: {_agreement(duck, pdres):.2e}")
        print(f"CPU-time ratio pandas / duckdb: {pdres['cpu_seconds'] / duck['cpu_seconds']:.1f}x")
    finally:
        if temp is not None:
            temp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
