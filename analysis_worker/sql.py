"""One SQL query per experiment: exposures joined with events, reduced to sufficient statistics.

The query is written once, in DuckDB's dialect, against two tables named `exposures` and
`events` with the columns of contract 3. DuckDB runs it on the lake's Parquet in place; `transpile`
turns the same query into Spark, BigQuery or Trino SQL with sqlglot, for teams whose lake outgrew
one machine (their output feeds `twofold stats`).

What the query does, in order:

1. Exposures of the experiment's flag (and rule) within [start, end); each spelling of a variant
   (`flags/<flag>/variants/<v>` or `<v>`) maps to the short name, anything else to `__unknown__`.
2. Per unit: the first exposure time and the set of variants seen. Units seen in more than one
   variant, or only in an unknown one, are excluded and counted (the last UNION ALL branch).
   Exposures need no deduplication here: a duplicated exposure changes neither the minimum time
   nor the set of variants.
3. Events of the metrics' names, deduplicated by `event_id` (a retried event counts once).
4. Per unit and metric: the value within the metric's window after the first exposure (binary:
   any event; count: number of events; sum: sum of values, a bare event counting 0), the
   denominator for ratios and the CUPED covariate (the same value in a window before exposure).
   For speed, event names become small integer codes before deduplication and each unit's window
   bounds are computed once, so the per-event work is integer and timestamp comparisons.
5. Optional capping at a fixed value or at a percentile over all units of the experiment
   (`PERCENTILE_CONT ... WITHIN GROUP`: exact on DuckDB and BigQuery; sqlglot maps it to
   PERCENTILE_APPROX on Spark and APPROX_PERCENTILE on Trino, so caps there are approximate).
6. Per variant and first-exposure day: n, sums, sums of squares and cross products, so daily
   cumulative looks can be summed up without re-reading the lake.
"""

from __future__ import annotations

import datetime as dt

import sqlglot

from analysis_worker.config import EventMeasure, ExperimentConfig, MetricConfig

UNKNOWN = "__unknown__"
MULTIPLE = "__multiple__"
DIALECTS = ("duckdb", "spark", "bigquery", "trino")


def quote(value: str) -> str:
    """A SQL string literal (single quotes doubled)."""
    return "'" + value.replace("'", "''") + "'"


def timestamp(value: dt.datetime) -> str:
    return f"CAST({quote(value.astimezone(dt.UTC).strftime('%Y-%m-%d %H:%M:%S.%f+00:00'))} AS TIMESTAMPTZ)"


def _interval(seconds: int) -> str:
    return f"INTERVAL '{int(seconds)}' SECOND"


def _names(events: tuple[str, ...]) -> str:
    return ", ".join(quote(e) for e in events)


def _codes(experiment: ExperimentConfig) -> dict[str, int]:
    """A small integer per event name: compared once per event instead of strings per metric."""
    names = dict.fromkeys(e for m in experiment.metrics for e in m.event_names)
    return {name: i + 1 for i, name in enumerate(names)}


def _window_value(measure: EventMeasure, codes: dict[str, int], lower: str, upper: str, binary: bool) -> str:
    """Per-unit aggregate of the events of `measure` with lower <= ts < upper."""
    wanted = [codes[e] for e in measure.events]
    match = f"e.code = {wanted[0]}" if len(wanted) == 1 else f"e.code IN ({', '.join(map(str, wanted))})"
    cond = f"{match} AND e.ts >= {lower} AND e.ts < {upper}"
    if binary:
        return f"MAX(CASE WHEN {cond} THEN 1 ELSE 0 END)"
    if measure.aggregate == "count":
        return f"SUM(CASE WHEN {cond} THEN 1 ELSE 0 END)"
    return f"SUM(CASE WHEN {cond} THEN e.value ELSE 0 END)"


def _after(seconds: int) -> str:
    return f"a.after_{int(seconds)}"


def _before(seconds: int) -> str:
    return f"a.before_{int(seconds)}"


def _metric_columns(i: int, metric: MetricConfig, codes: dict[str, int]) -> list[str]:
    binary = metric.kind == "binary"
    after = _after(metric.window_seconds)
    cols = [f"CAST({_window_value(metric.measure, codes, 'a.first_ts', after, binary)} AS DOUBLE) AS m{i}"]
    if metric.denominator is not None:
        cols.append(f"CAST({_window_value(metric.denominator, codes, 'a.first_ts', after, False)} AS DOUBLE) "
                    f"AS d{i}")
    if metric.cuped_window_seconds is not None:
        before = _before(metric.cuped_window_seconds)
        cols.append(f"CAST({_window_value(metric.measure, codes, before, 'a.first_ts', binary)} AS DOUBLE) AS c{i}")
    return cols


def value_columns(experiment: ExperimentConfig) -> list[str]:
    """Per-unit value columns of the query, in order (m<i>, d<i> for ratios, c<i> for CUPED)."""
    cols: list[str] = []
    for i, metric in enumerate(experiment.metrics):
        cols.append(f"m{i}")
        if metric.denominator is not None:
            cols.append(f"d{i}")
        if metric.cuped_window_seconds is not None:
            cols.append(f"c{i}")
    return cols


def stat_columns(experiment: ExperimentConfig) -> list[str]:
    """Output columns of the query after `variant`, `day` and `n`."""
    out: list[str] = []
    for i, metric in enumerate(experiment.metrics):
        out += [f"m{i}_sum", f"m{i}_sum_sq"]
        if metric.denominator is not None:
            out += [f"d{i}_sum", f"d{i}_sum_sq", f"m{i}_d{i}_sum"]
        if metric.cuped_window_seconds is not None:
            out += [f"c{i}_sum", f"c{i}_sum_sq", f"m{i}_c{i}_sum"]
    return out


def build_query(experiment: ExperimentConfig) -> str:
    """The sufficient-statistics query (DuckDB dialect) over tables `exposures` and `events`."""
    names = experiment.exposure_names()
    mapping = " ".join(f"WHEN {quote(full)} THEN {quote(short)}" for full, short in names.items())
    where = [f"flag IN ({_names(experiment.flag_names())})", f"ts >= {timestamp(experiment.start)}"]
    if experiment.rule:
        where.append(f"rule IN ({_names(experiment.rule_names())})")
    if experiment.end is not None:
        where.append(f"ts < {timestamp(experiment.end)}")
    all_events = tuple(dict.fromkeys(e for m in experiment.metrics for e in m.event_names))
    longest_pre = max((m.cuped_window_seconds or 0 for m in experiment.metrics), default=0)
    event_where = [f"name IN ({_names(all_events)})",
                   f"ts >= {timestamp(experiment.start - dt.timedelta(seconds=longest_pre))}"]
    if experiment.end is not None:
        event_where.append(f"ts < {timestamp(experiment.end)}")
    codes = _codes(experiment)
    code_case = " ".join(f"WHEN {quote(name)} THEN {code}" for name, code in codes.items())
    per_unit_cols = [c for i, m in enumerate(experiment.metrics) for c in _metric_columns(i, m, codes)]
    # Window ends and covariate starts, computed once per unit rather than once per event.
    bounds = [f"first_ts + {_interval(w)} AS after_{w}"
              for w in sorted({m.window_seconds for m in experiment.metrics})]
    bounds += [f"first_ts - {_interval(w)} AS before_{w}"
               for w in sorted({m.cuped_window_seconds for m in experiment.metrics if m.cuped_window_seconds})]

    cap_exprs: list[str] = []
    capped_cols: list[str] = []
    for i, metric in enumerate(experiment.metrics):
        cols = [f"m{i}"] + ([f"c{i}"] if metric.cuped_window_seconds is not None else [])
        for col in cols:
            if metric.cap is None:
                capped_cols.append(col)
            elif metric.cap.value is not None:
                capped_cols.append(f"LEAST({col}, CAST({metric.cap.value!r} AS DOUBLE)) AS {col}")
            else:
                level = metric.cap.percentile
                cap_exprs.append(f"PERCENTILE_CONT({level!r}) WITHIN GROUP (ORDER BY {col}) AS cap_{col}")
                capped_cols.append(f"LEAST({col}, cap_{col}) AS {col}")
        if metric.denominator is not None:
            capped_cols.append(f"d{i}")

    stats: list[str] = []
    for i, metric in enumerate(experiment.metrics):
        stats += [f"SUM(m{i}) AS m{i}_sum", f"SUM(m{i} * m{i}) AS m{i}_sum_sq"]
        if metric.denominator is not None:
            stats += [f"SUM(d{i}) AS d{i}_sum", f"SUM(d{i} * d{i}) AS d{i}_sum_sq",
                      f"SUM(m{i} * d{i}) AS m{i}_d{i}_sum"]
        if metric.cuped_window_seconds is not None:
            stats += [f"SUM(c{i}) AS c{i}_sum", f"SUM(c{i} * c{i}) AS c{i}_sum_sq",
                      f"SUM(m{i} * c{i}) AS m{i}_c{i}_sum"]
    nulls = [f"CAST(NULL AS DOUBLE) AS {c}" for c in stat_columns(experiment)]

    caps_cte = ""
    capped_from = "per_unit"
    if cap_exprs:
        caps_cte = f",\ncaps AS (\n  SELECT {', '.join(cap_exprs)} FROM per_unit\n)"
        capped_from = "per_unit CROSS JOIN caps"
    nl = ",\n    "
    return f"""WITH exposed AS (
  SELECT unit, ts, CASE variant {mapping} ELSE {quote(UNKNOWN)} END AS variant
  FROM exposures
  WHERE {' AND '.join(where)}
),
units AS (
  SELECT unit, MIN(ts) AS first_ts, MIN(variant) AS variant, COUNT(DISTINCT variant) AS variant_count
  FROM exposed
  GROUP BY unit
),
assigned AS (
  SELECT unit, first_ts, variant, {', '.join(bounds)}
  FROM units WHERE variant_count = 1 AND variant <> {quote(UNKNOWN)}
),
deduped_events AS (
  SELECT event_id, ANY_VALUE(unit) AS unit, ANY_VALUE(code) AS code, ANY_VALUE(ts) AS ts, ANY_VALUE(value) AS value
  FROM (
    SELECT event_id, unit, CASE name {code_case} END AS code, ts, COALESCE(value, 0) AS value
    FROM events
    WHERE {' AND '.join(event_where)}
  ) AS relevant
  GROUP BY event_id
),
per_unit AS (
  SELECT a.variant, CAST(a.first_ts AS DATE) AS day,
    {nl.join(per_unit_cols)}
  FROM assigned AS a LEFT JOIN deduped_events AS e ON e.unit = a.unit
  GROUP BY a.unit, a.variant, a.first_ts
){caps_cte},
capped AS (
  SELECT variant, day, {', '.join(capped_cols)} FROM {capped_from}
)
SELECT variant, day, COUNT(*) AS n,
    {nl.join(stats)}
FROM capped
GROUP BY variant, day
UNION ALL
SELECT CASE WHEN variant_count > 1 THEN {quote(MULTIPLE)} ELSE {quote(UNKNOWN)} END AS variant,
    CAST(NULL AS DATE) AS day, COUNT(*) AS n,
    {nl.join(nulls)}
FROM units
WHERE variant_count > 1 OR variant = {quote(UNKNOWN)}
GROUP BY CASE WHEN variant_count > 1 THEN {quote(MULTIPLE)} ELSE {quote(UNKNOWN)} END
"""


def transpile(query: str, dialect: str) -> str:
    """The same query in another engine's dialect (spark, bigquery, trino, duckdb)."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown dialect {dialect!r}; one of {', '.join(DIALECTS)}")
    return sqlglot.transpile(query, read="duckdb", write=dialect, pretty=True)[0]
