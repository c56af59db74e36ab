"""The Python API: analyse an experiment against a lake folder, get the results document and a report.

    from analysis_worker.analyze import analyze
    result = analyze("examples/experiments/home-ranking.yaml", lake="data/lake")   # engine="spark" too
    result.document["decision"]["recommendation"]   # contract 5
    result.write("out/")                              # home-ranking.json + home-ranking.html

Problems with the data (no lake, no exposures table, nobody exposed to the flag, a metric without
events, a variant without units) never raise: they come back as an `error` or as `warnings` in
the document, so a scheduler computing many experiments carries on with the others. Only an
invalid definition raises `ConfigError`, because then there is no experiment to report on.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis_worker.compute import compute_results
from analysis_worker.config import ExperimentConfig, load_experiment
from analysis_worker.engine import Engine, LakeSession, make_engine
from analysis_worker.inputs import MetricInput, SequentialInput, StatsInput, VariantStats
from analysis_worker.lake import LakeError
from analysis_worker.sql import (
    MULTIPLE,
    UNKNOWN,
    caps_query,
    null_rows_query,
    per_unit_query,
    percentile_caps,
    stat_columns,
    statistics_query,
)


@dataclass
class Analysis:
    """One computation: the results document, its HTML report and what it cost."""

    experiment: str
    document: dict[str, Any]
    duration_seconds: float = 0.0
    rows_scanned: int = 0
    sql: str = ""
    error: str | None = None
    _html: str | None = field(default=None, repr=False)

    @property
    def html(self) -> str:
        """The self-contained HTML report (rendered on first use)."""
        if self._html is None:
            from analysis_worker.report import render_html

            self._html = render_html(self.document)
        return self._html

    def reset_html(self) -> None:
        """Forget the rendered report (after the document was replaced)."""
        self._html = None

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write `<experiment>.json` and `<experiment>.html` into `out_dir` (created if needed)."""
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        json_path = folder / f"{self.experiment}.json"
        html_path = folder / f"{self.experiment}.html"
        for path, text in ((json_path, json.dumps(self.document, indent=2) + "\n"), (html_path, self.html)):
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text)
            tmp.replace(path)
        return json_path, html_path


def error_document(name: str, message: str, computed_at: dt.datetime, *, recommendation: str = "keep-running",
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A results document that says why nothing could be computed (same top-level fields)."""
    document: dict[str, Any] = {
        "experiment": name,
        "computed_at": computed_at.isoformat().replace("+00:00", "Z"),
        "error": message,
        "units": {},
        "srm": None,
        "metrics": [],
        "decision": {"recommendation": recommendation, "reasons": [message]},
        "warnings": [],
    }
    document.update(extra or {})
    return document


def _variant_stats(row: Mapping[str, Any], i: int, has_den: bool, has_cov: bool) -> VariantStats:
    def g(key: str) -> float:
        value = row.get(key)
        return 0.0 if value is None else float(value)

    return VariantStats(
        n=g("n"), sum=g(f"m{i}_sum"), sum_sq=g(f"m{i}_sum_sq"),
        den_sum=g(f"d{i}_sum") if has_den else 0.0, den_sum_sq=g(f"d{i}_sum_sq") if has_den else 0.0,
        prod_sum=g(f"m{i}_d{i}_sum") if has_den else 0.0,
        cov_sum=g(f"c{i}_sum") if has_cov else 0.0, cov_sum_sq=g(f"c{i}_sum_sq") if has_cov else 0.0,
        cov_prod_sum=g(f"m{i}_c{i}_sum") if has_cov else 0.0)


def _accumulate(rows: list[dict[str, Any]], columns: list[str]) -> dict[str, dict[str, float]]:
    totals: dict[str, dict[str, float]] = {}
    for row in rows:
        acc = totals.setdefault(row["variant"], dict.fromkeys(["n", *columns], 0.0))
        for key in acc:
            acc[key] += float(row.get(key) or 0.0)
    return totals


def stats_input_from_rows(experiment: ExperimentConfig, rows: list[dict[str, Any]]) -> StatsInput:
    """Turn the query's rows (per variant and first-exposure day) into a `StatsInput` with daily looks."""
    columns = stat_columns(experiment)
    data = [r for r in rows if r["variant"] in experiment.split]
    days = sorted({r["day"] for r in data})
    totals = _accumulate(data, columns)
    cumulative: list[dict[str, dict[str, float]]] = [_accumulate([r for r in data if r["day"] <= d], columns)
                                                     for d in days]
    looks = [sum(v["n"] for v in snap.values()) for snap in cumulative]
    metrics: list[MetricInput] = []
    for i, metric in enumerate(experiment.metrics):
        has_den = metric.denominator is not None
        has_cov = metric.cuped_window_seconds is not None
        variants = {v: _variant_stats(totals.get(v, {}), i, has_den, has_cov) for v in experiment.split}
        history = [{v: _variant_stats(snap.get(v, {}), i, has_den, has_cov) for v in experiment.split}
                   for snap in cumulative]
        metrics.append(MetricInput(name=metric.name, kind=metric.kind, role=metric.role,
                                   direction=metric.direction, nim=metric.nim, variants=variants,
                                   cuped=has_cov, test=metric.test, mde=metric.mde, history=history))
    seq = experiment.sequential
    return StatsInput(
        alpha=experiment.alpha, power=experiment.power, correction=experiment.correction,
        control=experiment.control, expected_split=dict(experiment.split), metrics=metrics,
        sequential=None if seq is None else SequentialInput(method=seq.method, expected_n=seq.expected_units,
                                                            looks=looks[:-1], rho=seq.rho),
        experiment=experiment.name, units={v: totals.get(v, {}).get("n", 0.0) for v in experiment.split},
        deterioration_alpha=experiment.deterioration_alpha)


def _known_flags(lake: LakeSession) -> list[str]:
    return [r["flag"] for r in lake.rows("SELECT DISTINCT flag FROM exposures ORDER BY flag LIMIT 20")]


def _caps_document(config: ExperimentConfig, caps: Mapping[str, float | None]) -> dict[str, dict[str, Any]]:
    """The percentile caps the statistics used, per metric (`value`; `covariate` for its CUPED covariate)."""
    out: dict[str, dict[str, Any]] = {}
    for i, metric in enumerate(config.metrics):
        if f"m{i}" in caps and metric.cap is not None:
            entry: dict[str, Any] = {"percentile": metric.cap.percentile, "value": caps[f"m{i}"]}
            if f"c{i}" in caps:
                entry["covariate"] = caps[f"c{i}"]
            out[metric.name] = entry
    return out


def _day(value: Any) -> dt.date:
    """Engines return a DATE as `datetime.date`; a timestamp at midnight from some drivers."""
    return value.date() if isinstance(value, dt.datetime) else value


@dataclass(frozen=True)
class Statistics:
    """What the SQL steps returned: rows per variant and day, the percentile caps, the rows excluded for
    a NULL unit or id (`null_rows_query`), and the statements."""

    rows: list[dict[str, Any]]
    caps: dict[str, float | None]
    null_rows: dict[str, int]
    steps: list[str]


def sufficient_statistics(tables: LakeSession, config: ExperimentConfig) -> Statistics:
    """Run the steps of `analysis_worker.engine` on an open lake; `LakeError` if the engine fails."""
    steps = [per_unit_query(config)]
    tables.materialize("per_unit", steps[0])
    caps: dict[str, float | None] = {}
    caps_sql = caps_query(config)
    if caps_sql is not None:
        steps.append(caps_sql)
        (row,) = tables.rows(caps_sql)
        caps = {col: None if row[f"cap_{col}"] is None else float(row[f"cap_{col}"])
                for col in percentile_caps(config)}
    steps.append(statistics_query(config, caps))
    rows = [dict(r, day=_day(r["day"])) for r in tables.rows(steps[-1])]
    steps.append(null_rows_query(config, events=tables.present["events"]))
    (nulls,) = tables.rows(steps[-1])
    return Statistics(rows=rows, caps=caps, null_rows={k: int(v) for k, v in nulls.items()}, steps=steps)


def analyze(experiment: str | Path | Mapping[str, Any] | ExperimentConfig, lake: str | Path, *,
            now: dt.datetime | None = None, threads: int | None = None,
            memory_limit: str | None = None, engine: str | Engine = "duckdb") -> Analysis:
    """Compute the results of one experiment from the lake at `lake` (see the module doc).

    `engine` is "duckdb" (default; `threads` and `memory_limit` are its settings), "spark" (a
    local Spark session; see `analysis_worker.engine_spark`) or an `Engine` made by
    `analysis_worker.engine.make_engine` (a Spark cluster, Spark Connect), which is left open.
    """
    config = experiment if isinstance(experiment, ExperimentConfig) else load_experiment(experiment)
    started = time.perf_counter()
    computed_at = now or dt.datetime.now(dt.UTC)
    runner = make_engine(engine, threads=threads, memory_limit=memory_limit) if isinstance(engine, str) else engine
    steps = [per_unit_query(config)]
    base = {"flag": config.flag, "rule": config.rule, "lake": str(lake), "engine": runner.name,
            "start": config.start.isoformat(), "end": config.end.isoformat() if config.end else None}

    def failed(message: str, rows_scanned: int = 0) -> Analysis:
        doc = error_document(config.name, message, computed_at, extra=base)
        return Analysis(experiment=config.name, document=doc, duration_seconds=time.perf_counter() - started,
                        rows_scanned=rows_scanned, sql=";\n\n".join(steps), error=message)

    try:
        tables = runner.open(lake)
    except LakeError as exc:
        if isinstance(engine, str):
            runner.close()
        return failed(str(exc))
    try:
        if not tables.present["exposures"]:
            return failed(f"the lake at {str(lake)!r} has no exposures table "
                          "(expected exposures/date=YYYY-MM-DD/*.parquet)")
        scanned = 0
        try:
            scanned = tables.row_count("exposures") + tables.row_count("events")
            statistics = sufficient_statistics(tables, config)
        except LakeError as exc:
            return failed(f"reading the lake failed: {exc}", scanned)
        steps[:] = statistics.steps
        rows, caps, null_rows = statistics.rows, statistics.caps, statistics.null_rows
        excluded = {r["variant"]: int(r["n"]) for r in rows if r["variant"] in (MULTIPLE, UNKNOWN)}
        data = [r for r in rows if r["variant"] not in (MULTIPLE, UNKNOWN)]
        if not data:
            flags = _known_flags(tables)
            where = f" with rule {config.rule!r}" if config.rule else ""
            window = f"between {config.start.isoformat()} and {config.end.isoformat() if config.end else 'now'}"
            if not set(config.flag_names()) & set(flags):
                message = (f"no exposures of flag {config.flag!r} in the lake; flags with exposures: "
                           f"{', '.join(flags) or 'none'}")
            elif excluded:
                message = (f"every unit exposed to {config.flag!r}{where} was excluded "
                           f"({excluded.get(MULTIPLE, 0)} in several variants, {excluded.get(UNKNOWN, 0)} in "
                           f"variants not in the definition: {', '.join(config.split)})")
            else:
                message = f"no exposures of flag {config.flag!r}{where} {window}"
            return failed(message, scanned)
        segments: dict[str, Any] | None = None
        if config.dimensions:
            from analysis_worker.segments import segment_breakdowns

            try:
                segments = segment_breakdowns(tables, lake, config,
                                              lambda t, c: sufficient_statistics(t, c).rows, stats_input_from_rows)
            except (LakeError, OSError) as exc:
                segments = {"dimensions": [], "error": f"reading the segments failed: {exc}"}
    finally:
        tables.close()
        if isinstance(engine, str):
            runner.close()

    stats = stats_input_from_rows(config, data)
    running = config.end is None or config.end > computed_at
    warnings: list[str] = []
    if not tables.present["events"]:
        warnings.append(f"the lake at {str(lake)!r} has no events table: every metric is zero")
    for metric, inp in zip(config.metrics, stats.metrics, strict=True):
        if all(v.sum == 0 and v.sum_sq == 0 for v in inp.variants.values()):
            warnings.append(f"metric {metric.name!r}: no {', '.join(metric.measure.events)} events within "
                            "the window of any exposed unit")
    days = sorted({r["day"] for r in data})
    extra = {
        **base,
        "exclusions": {"multiple_variants": excluded.get(MULTIPLE, 0), "unknown_variant": excluded.get(UNKNOWN, 0),
                       **null_rows},
        "caps": _caps_document(config, caps),
        "look_dates": [d.isoformat() for d in days],
        "rows_scanned": scanned,
    }
    document = compute_results(stats, computed_at=computed_at, running=running, extra=extra)
    from analysis_worker.breakdowns import daily

    document["daily"] = daily(config, data, stats_input_from_rows)
    if segments is not None:
        document["segments"] = segments
    document["warnings"] = warnings + document.get("warnings", [])
    if excluded.get(MULTIPLE):
        document["warnings"].append(f"{excluded[MULTIPLE]} unit(s) exposed to more than one variant were excluded")
    for key, what in (("exposures_null_unit", "exposure(s) without a unit"),
                      ("exposures_null_id", "exposure(s) without an exposure_id"),
                      ("events_null_unit", "event(s) without a unit"),
                      ("events_null_id", "event(s) without an event_id")):
        if null_rows.get(key):
            document["warnings"].append(
                f"{null_rows[key]} {what} were excluded (contract 3: never merged into another)")
    if excluded.get(UNKNOWN):
        document["warnings"].append(f"{excluded[UNKNOWN]} unit(s) exposed only to variants not in the definition "
                                    "were excluded")
    return Analysis(experiment=config.name, document=document, duration_seconds=time.perf_counter() - started,
                    rows_scanned=scanned, sql=";\n\n".join(steps))
