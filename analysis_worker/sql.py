"""One SQL query per experiment: exposures joined with events, reduced to sufficient statistics.

The query is written once, in DuckDB's dialect, against two tables named `exposures` and
`events` with the columns of contract 3. DuckDB runs it on the lake's Parquet in place; `transpile`
turns the same query into Spark, BigQuery or Trino SQL with sqlglot, for teams whose lake outgrew
one machine (their output feeds `twofold stats`).

What the query does, in order:

1. Exposures of the experiment's flag (and rule) within [start, end), without the rows whose
   unit or exposure id is NULL (counted by `null_rows_query`); each spelling of a variant
   (`flags/<flag>/variants/<v>` or `<v>`) maps to a small integer, anything else to -1.
2. Per unit: the first exposure time and the lowest and highest variant seen. Units seen in more
   than one variant (lowest <> highest), or only in an unknown one, are excluded and counted (the
   last UNION ALL branch). Exposures need no deduplication here: a duplicated exposure changes
   neither the minimum time nor the set of variants. Each unit's window bounds (first exposure
   plus or minus each window length) are computed here, once per unit.
3. Events of the metrics' names, joined to their unit's first exposure, keeping only those within
   the windows their name is measured in (see `_Windows`): about half of all events in a typical
   lake, as the rest are outside every window (or before exposure, for names without a covariate).
4. Those events deduplicated by `event_id`: each id counts at most once (events with a NULL
   unit or id never get here: they are counted by `null_rows_query`). Dropping the events
   outside every window first changes nothing when an id's copies are identical; when they
   differ (a retry stamped with a later receive time, a client reusing ids), the copy counted is
   one of those within a window (ANY_VALUE: which one is unspecified, as with any dedup by id).
5. Per unit and metric: the value within the metric's window after the first exposure (binary:
   any event; count: number of events; sum: sum of values, a bare event counting 0), the
   denominator for ratios and the CUPED covariate (the same value in a window before exposure);
   units without any such event get zeros (the LEFT JOIN). Event names are small integer codes
   and each event carries the number of the zone between window bounds it falls in, so the
   per-event work in the aggregation is integer comparisons.
6. Optional capping at a fixed value or at a percentile over all units of the experiment
   (`PERCENTILE_CONT ... WITHIN GROUP`: exact on DuckDB and BigQuery; sqlglot maps it to
   PERCENTILE_APPROX on Spark and APPROX_PERCENTILE on Trino, so caps there are approximate).
7. Per variant and first-exposure day: n, sums, sums of squares and cross products, so daily
   cumulative looks can be summed up without re-reading the lake.
"""

from __future__ import annotations

import datetime as dt

import sqlglot
from sqlglot import exp

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


def _bound(offset: int) -> str:
    """The column of `assigned` holding first exposure + `offset` seconds."""
    if offset == 0:
        return "a.first_ts"
    return f"a.after_{offset}" if offset > 0 else f"a.before_{-offset}"


class _Windows:
    """Where each event falls relative to its unit's first exposure, in as few per-event operations as possible.

    Every window of the experiment is [first + lo, first + hi) for offsets lo < hi (a metric's window:
    lo = 0, hi = its length; a CUPED covariate: lo = -its length, hi = 0). The sorted distinct offsets
    cut time into zones; zone z (1-based) is [first + offsets[z-1], first + offsets[z]), so every
    window is a range of zones. For each event name, the union of the windows it is measured in is one
    interval (after-exposure windows all start at 0, covariate windows all end at 0): an event outside
    its name's interval counts nowhere and is dropped before deduplication.
    """

    def __init__(self, experiment: ExperimentConfig, codes: dict[str, int]) -> None:
        offsets = {0}
        self.lower = dict.fromkeys(codes.values(), 0)
        self.upper = dict.fromkeys(codes.values(), 0)
        for metric in experiment.metrics:
            offsets.add(metric.window_seconds)
            for name in metric.event_names:
                self.upper[codes[name]] = max(self.upper[codes[name]], metric.window_seconds)
            if metric.cuped_window_seconds is not None:
                offsets.add(-metric.cuped_window_seconds)
                for name in metric.measure.events:
                    self.lower[codes[name]] = min(self.lower[codes[name]], -metric.cuped_window_seconds)
        self.offsets = sorted(offsets)
        self.codes = codes

    def zone(self, offset: int) -> int:
        return self.offsets.index(offset) + 1

    def bounds(self) -> list[str]:
        """The per-unit columns of `assigned` besides first_ts: first_ts +/- each offset."""
        return [f"first_ts {'+' if o > 0 else '-'} {_interval(abs(o))} AS {_bound(o)[2:]}" for o in self.offsets if o]

    def earliest(self, start: dt.datetime) -> list[str]:
        """Conditions on the events table alone: no unit is exposed before `start`, so an event of a
        name without a covariate window (or with a short one) before start + its lower offset counts
        nowhere, whoever its unit is. Dropping those before the join saves probing for them."""
        conditions = []
        for lo in sorted(set(self.lower.values()))[1:]:
            earlier = tuple(name for name, code in self.codes.items() if self.lower[code] < lo)
            since = timestamp(start + dt.timedelta(seconds=lo))
            conditions.append(f"(ts >= {since} OR name IN ({_names(earlier)}))")
        return conditions

    def relevant(self) -> str:
        """An event's time is within the union of the windows its name is measured in."""
        return f"e.ts >= {self._per_code(self.lower)} AND e.ts < {self._per_code(self.upper)}"

    def _per_code(self, offsets: dict[int, int]) -> str:
        common = max(set(offsets.values()), key=list(offsets.values()).count)
        cases = " ".join(f"WHEN {code} THEN {_bound(o)}" for code, o in offsets.items() if o != common)
        return f"CASE e.code {cases} ELSE {_bound(common)} END" if cases else _bound(common)

    @property
    def zoned(self) -> bool:
        """Whether events need a zone at all (with a single window and no covariate, the name says it all)."""
        return len(self.offsets) > 2

    def zone_expression(self) -> str:
        """The zone of a relevant event (after the relevance filter: 1 .. len(offsets) - 1)."""
        cases = " ".join(f"WHEN e.ts >= {_bound(self.offsets[z - 1])} THEN {z}"
                         for z in range(len(self.offsets) - 1, 1, -1))
        return f"CASE {cases} ELSE 1 END"

    def condition(self, events: tuple[str, ...], lo: int, hi: int) -> str:
        """An (already deduplicated, relevant) event of one of `events` within [first + lo, first + hi)."""
        by_zones: dict[tuple[int | None, int | None], list[int]] = {}
        for name in events:
            code = self.codes[name]
            zl = self.zone(lo) if self.zone(lo) > self.zone(self.lower[code]) else None
            zh = self.zone(hi) if self.zone(hi) < self.zone(self.upper[code]) else None
            by_zones.setdefault((zl, zh), []).append(code)
        terms = []
        for (zl, zh), wanted in by_zones.items():
            parts = [f"code = {wanted[0]}" if len(wanted) == 1 else f"code IN ({', '.join(map(str, wanted))})"]
            if zl is not None:
                parts.append(f"zone >= {zl}")
            if zh is not None:
                parts.append(f"zone < {zh}")
            terms.append(" AND ".join(parts))
        return terms[0] if len(terms) == 1 else " OR ".join(f"({t})" for t in terms)


def _window_value(measure: EventMeasure, windows: _Windows, lo: int, hi: int, binary: bool) -> str:
    """Per-unit aggregate of the deduplicated events of `measure` within [first + lo, first + hi)."""
    cond = windows.condition(measure.events, lo, hi)
    if binary:
        return f"MAX(CASE WHEN {cond} THEN 1 ELSE 0 END)"
    if measure.aggregate == "count":
        return f"COUNT(CASE WHEN {cond} THEN 1 END)"
    return f"SUM(CASE WHEN {cond} THEN value ELSE 0 END)"


def _metric_columns(i: int, metric: MetricConfig, windows: _Windows) -> list[str]:
    binary = metric.kind == "binary"
    w = metric.window_seconds
    cols = [f"CAST({_window_value(metric.measure, windows, 0, w, binary)} AS DOUBLE) AS m{i}"]
    if metric.denominator is not None:
        cols.append(f"CAST({_window_value(metric.denominator, windows, 0, w, False)} AS DOUBLE) AS d{i}")
    if metric.cuped_window_seconds is not None:
        c = metric.cuped_window_seconds
        cols.append(f"CAST({_window_value(metric.measure, windows, -c, 0, binary)} AS DOUBLE) AS c{i}")
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


def _exposure_filter(experiment: ExperimentConfig) -> list[str]:
    """The experiment's exposures: its flag (and rule) within [start, end)."""
    where = [f"flag IN ({_names(experiment.flag_names())})", f"ts >= {timestamp(experiment.start)}"]
    if experiment.rule:
        where.append(f"rule IN ({_names(experiment.rule_names())})")
    if experiment.end is not None:
        where.append(f"ts < {timestamp(experiment.end)}")
    return where


def _event_filter(experiment: ExperimentConfig) -> list[str]:
    """Events of the metrics' names from the start of the longest covariate window to the end."""
    all_events = tuple(dict.fromkeys(e for m in experiment.metrics for e in m.event_names))
    longest_pre = max((m.cuped_window_seconds or 0 for m in experiment.metrics), default=0)
    where = [f"name IN ({_names(all_events)})",
             f"ts >= {timestamp(experiment.start - dt.timedelta(seconds=longest_pre))}"]
    if experiment.end is not None:
        where.append(f"ts < {timestamp(experiment.end)}")
    return where


def null_rows_query(experiment: ExperimentConfig, *, events: bool = True) -> str:
    """Counts of the experiment's rows that the main query excludes for a NULL unit or id.

    Contract 3: such rows (written by other tools; Twofold's writer never writes them) are
    excluded and counted, never merged into another: a NULL unit would otherwise group into one
    phantom unit, NULL event ids into one event. Columns: exposures_null_unit, exposures_null_id,
    events_null_unit, events_null_id (rows, not units). Cheap on lakes without NULLs: the Parquet
    statistics say a row group has none, and DuckDB skips it.
    """
    exposures = " AND ".join(_exposure_filter(experiment))
    parts = [f"(SELECT COUNT(*) FROM exposures WHERE {exposures} AND unit IS NULL) AS exposures_null_unit",
             f"(SELECT COUNT(*) FROM exposures WHERE {exposures} AND unit IS NOT NULL AND exposure_id IS NULL) "
             "AS exposures_null_id"]
    if events:
        where = " AND ".join(_event_filter(experiment))
        parts += [f"(SELECT COUNT(*) FROM events WHERE {where} AND unit IS NULL) AS events_null_unit",
                  f"(SELECT COUNT(*) FROM events WHERE {where} AND unit IS NOT NULL AND event_id IS NULL) "
                  "AS events_null_id"]
    else:
        parts += ["0 AS events_null_unit", "0 AS events_null_id"]
    return "SELECT " + ",\n  ".join(parts)


def build_query(experiment: ExperimentConfig) -> str:
    """The sufficient-statistics query (DuckDB dialect) over tables `exposures` and `events`."""
    short_names = list(experiment.split)
    names = experiment.exposure_names()
    # Variants as small integers (-1: not in the definition) while grouping 10M exposures by unit.
    mapping = " ".join(f"WHEN {quote(full)} THEN {short_names.index(short)}" for full, short in names.items())
    unmap = " ".join(f"WHEN {i} THEN {quote(short)}" for i, short in enumerate(short_names))
    where = [*_exposure_filter(experiment), "unit IS NOT NULL", "exposure_id IS NOT NULL"]
    event_where = [*_event_filter(experiment), "unit IS NOT NULL", "event_id IS NOT NULL"]
    codes = _codes(experiment)
    code_case = " ".join(f"WHEN {quote(name)} THEN {code}" for name, code in codes.items())
    windows = _Windows(experiment, codes)
    event_where += windows.earliest(experiment.start)
    per_unit_cols = [c for i, m in enumerate(experiment.metrics) for c in _metric_columns(i, m, windows)]
    # Window ends and covariate starts, computed once per unit rather than once per event.
    bounds = windows.bounds()

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
    zone = f", {windows.zone_expression()} AS zone" if windows.zoned else ""
    zeros = [f"COALESCE(p.{c}, 0) AS {c}" for c in value_columns(experiment)]
    nl = ",\n    "
    return f"""WITH exposed AS (
  SELECT unit, ts, CASE variant {mapping} ELSE -1 END AS variant
  FROM exposures
  WHERE {' AND '.join(where)}
),
units AS (
  SELECT unit, MIN(ts) AS first_ts, MIN(variant) AS variant, MAX(variant) AS last_variant
  FROM exposed
  GROUP BY unit
),
assigned AS (
  SELECT unit, first_ts, CASE variant {unmap} END AS variant, {', '.join(bounds)}
  FROM units WHERE variant = last_variant AND variant >= 0
),
relevant AS (
  SELECT e.event_id, e.unit, e.code{zone}, e.value
  FROM (
    SELECT event_id, unit, CASE name {code_case} END AS code, ts, COALESCE(value, 0) AS value
    FROM events
    WHERE {' AND '.join(event_where)}
  ) AS e
  JOIN assigned AS a ON e.unit = a.unit
  WHERE {windows.relevant()}
),
deduped AS (
  SELECT event_id, ANY_VALUE(unit) AS unit, ANY_VALUE(code) AS code,{' ANY_VALUE(zone) AS zone,' if zone else ''}
    ANY_VALUE(value) AS value
  FROM relevant
  GROUP BY event_id
),
unit_values AS (
  SELECT unit,
    {nl.join(per_unit_cols)}
  FROM deduped
  GROUP BY unit
),
per_unit AS (
  SELECT a.variant, CAST(a.first_ts AS DATE) AS day,
    {nl.join(zeros)}
  FROM assigned AS a LEFT JOIN unit_values AS p ON p.unit = a.unit
){caps_cte},
capped AS (
  SELECT variant, day, {', '.join(capped_cols)} FROM {capped_from}
)
SELECT variant, day, COUNT(*) AS n,
    {nl.join(stats)}
FROM capped
GROUP BY variant, day
UNION ALL
SELECT CASE WHEN variant <> last_variant THEN {quote(MULTIPLE)} ELSE {quote(UNKNOWN)} END AS variant,
    CAST(NULL AS DATE) AS day, COUNT(*) AS n,
    {nl.join(nulls)}
FROM units
WHERE variant <> last_variant OR variant < 0
GROUP BY CASE WHEN variant <> last_variant THEN {quote(MULTIPLE)} ELSE {quote(UNKNOWN)} END
"""


def transpile(query: str, dialect: str) -> str:
    """The same query in another engine's dialect (spark, bigquery, trino, duckdb)."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown dialect {dialect!r}; one of {', '.join(DIALECTS)}")
    tree = sqlglot.parse_one(query, read="duckdb")
    # DuckDB's ANY_VALUE skips NULLs, so sqlglot spells it `ARBITRARY(x) IGNORE NULLS` for Trino
    # and `ANY_VALUE(x IGNORE NULLS)` for BigQuery, which neither accepts. The query only takes
    # ANY_VALUE of columns that are never NULL, so the plain function means the same everywhere.
    tree = tree.transform(
        lambda node: node.this if isinstance(node, exp.IgnoreNulls) and isinstance(node.this, exp.AnyValue) else node)
    return tree.sql(dialect=dialect, pretty=True)
