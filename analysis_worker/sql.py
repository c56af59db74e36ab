"""The metric SQL: exposures joined with events, reduced to sufficient statistics.

Written once, in DuckDB's dialect, against two tables named `exposures` and `events` with the
columns of contract 3 and their Hive partition column `date`. Engines (`analysis_worker.engine`)
run it as three statements: `per_unit_query` (steps 1-5, kept as a table `per_unit`),
`caps_query` (the exact percentile caps, one row) and `statistics_query` (step 7, with the caps
inlined as literals). `build_query` joins the three into one statement, which `transpile` turns
into Spark, BigQuery or Trino SQL with sqlglot, for teams who run it in their own warehouse (its
output feeds `twofold stats`). Nothing depends on the session time zone: window bounds are
integer microseconds since the epoch and days are UTC days counted from them.

What the SQL does, in order:

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
6. Optional capping at a fixed value or at a percentile over all units of the experiment, exact
   in every dialect (DuckDB QUANTILE_CONT, Spark PERCENTILE, BigQuery's analytic PERCENTILE_CONT,
   Trino from ranks: see `transpile`).
7. Per variant and first-exposure day: n, sums, sums of squares and cross products, so daily
   cumulative looks can be summed up without re-reading the lake.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

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


MICROS = 1_000_000


def epoch_us(column: str) -> str:
    """Microseconds since the epoch (DuckDB's EPOCH_US; `transpile` spells it per dialect).

    Window bounds are computed on these integers, not with `ts + INTERVAL ...`: Spark adds the
    day part of an interval in the session time zone, so a 7-day window across a daylight-saving
    change there is 167 or 169 hours long.
    """
    return f"EPOCH_US({column})"


def _names(events: tuple[str, ...]) -> str:
    return ", ".join(quote(e) for e in events)


def _codes(experiment: ExperimentConfig) -> dict[str, int]:
    """A small integer per event name: compared once per event instead of strings per metric."""
    names = dict.fromkeys(e for m in experiment.metrics for e in m.event_names)
    return {name: i + 1 for i, name in enumerate(names)}


def _bound(offset: int) -> str:
    """The column of `assigned` holding first exposure + `offset` seconds."""
    if offset == 0:
        return "a.first_us"
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
        """The per-unit columns of `assigned` besides first_us: first_us +/- each offset (microseconds)."""
        return [f"first_us {'+' if o > 0 else '-'} {abs(o) * MICROS} AS {_bound(o)[2:]}" for o in self.offsets if o]

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
        return f"e.us >= {self._per_code(self.lower)} AND e.us < {self._per_code(self.upper)}"

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
        cases = " ".join(f"WHEN e.us >= {_bound(self.offsets[z - 1])} THEN {z}"
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


def percentile_caps(experiment: ExperimentConfig) -> dict[str, float]:
    """The per-unit columns capped at a percentile of all units, with their levels (`m1` -> 0.99)."""
    caps: dict[str, float] = {}
    for i, metric in enumerate(experiment.metrics):
        if metric.cap is not None and metric.cap.percentile is not None:
            caps[f"m{i}"] = metric.cap.percentile
            if metric.cuped_window_seconds is not None:
                caps[f"c{i}"] = metric.cap.percentile
    return caps


def _day(column: str) -> str:
    """The UTC calendar day of a timestamp, the same whatever the session time zone.

    `CAST(ts AS DATE)` takes the day in the session's zone (Spark's `spark.sql.session.timeZone`,
    DuckDB's `TimeZone`), so a unit exposed at 02:00 UTC would land on the previous day in
    America/Los_Angeles. Microseconds since the epoch do not depend on any zone, and every UTC day
    is 86,400,000,000 of them.
    """
    # The outer CAST keeps a DATE where sqlglot writes DuckDB's DATE_ADD as `date + INTERVAL` (a timestamp).
    days = f"CAST(FLOOR({epoch_us(column)} / {86_400 * MICROS}) AS INTEGER)"
    return f"CAST(DATE_ADD(CAST('1970-01-01' AS DATE), {days}) AS DATE)"


def _partitions(first: dt.datetime, last: dt.datetime | None) -> str:
    """A predicate on the `date` partition column that lets every engine skip the other days' files.

    The lake's writers file a row under the UTC date of its `ts`; one day of margin on each side
    keeps every row even for a writer that files by a local date. The exact bounds stay on `ts`.
    """
    lo = (first.astimezone(dt.UTC).date() - dt.timedelta(days=1)).isoformat()
    where = f'"date" >= CAST({quote(lo)} AS DATE)'
    if last is not None:
        hi = (last.astimezone(dt.UTC).date() + dt.timedelta(days=1)).isoformat()
        where += f' AND "date" <= CAST({quote(hi)} AS DATE)'
    return where


def _exposure_filter(experiment: ExperimentConfig) -> list[str]:
    """The experiment's exposures: its flag (and rule) within [start, end), and their partitions."""
    where = [f"flag IN ({_names(experiment.flag_names())})", f"ts >= {timestamp(experiment.start)}"]
    if experiment.rule:
        where.append(f"rule IN ({_names(experiment.rule_names())})")
    if experiment.end is not None:
        where.append(f"ts < {timestamp(experiment.end)}")
    where.append(_partitions(experiment.start, experiment.end))
    return where


def _event_filter(experiment: ExperimentConfig) -> list[str]:
    """Events of the metrics' names from the start of the longest covariate window to the end."""
    all_events = tuple(dict.fromkeys(e for m in experiment.metrics for e in m.event_names))
    longest_pre = max((m.cuped_window_seconds or 0 for m in experiment.metrics), default=0)
    since = experiment.start - dt.timedelta(seconds=longest_pre)
    where = [f"name IN ({_names(all_events)})", f"ts >= {timestamp(since)}"]
    if experiment.end is not None:
        where.append(f"ts < {timestamp(experiment.end)}")
    where.append(_partitions(since, experiment.end))
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


def _excluded_label(units: str) -> str:
    return (f"CASE WHEN {units}.variant <> {units}.last_variant THEN {quote(MULTIPLE)} "
            f"WHEN {units}.variant < 0 THEN {quote(UNKNOWN)} END")


def _per_unit(experiment: ExperimentConfig) -> str:
    """The per-unit step (DuckDB dialect): one row per exposed unit, ending in `SELECT ... FROM units`.

    Columns: `variant` (its short name, or MULTIPLE / UNKNOWN for an excluded unit), `day` (UTC day
    of the first exposure) and the value columns (`value_columns`), zero for units without events.
    """
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
  SELECT unit, {epoch_us('first_ts')} AS first_us, {', '.join(bounds)}
  FROM units WHERE variant = last_variant AND variant >= 0
),
relevant AS (
  SELECT e.event_id, e.unit, e.code{zone}, e.value
  FROM (
    SELECT event_id, unit, CASE name {code_case} END AS code, {epoch_us('ts')} AS us, COALESCE(value, 0) AS value
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
)
SELECT COALESCE({_excluded_label('u')}, CASE u.variant {unmap} END) AS variant, {_day('u.first_ts')} AS day,
    {nl.join(zeros)}
FROM units AS u LEFT JOIN unit_values AS p ON p.unit = u.unit"""


def per_unit_query(experiment: ExperimentConfig) -> str:
    """Step 1 (DuckDB dialect): the per-unit values, which an engine keeps as the table `per_unit`."""
    return _per_unit(experiment)


_EXCLUDED = f"variant IN ({quote(MULTIPLE)}, {quote(UNKNOWN)})"


def caps_query(experiment: ExperimentConfig) -> str | None:
    """Step 2 (DuckDB dialect), only with percentile caps: one row, `cap_<column>` per capped column.

    Exact percentiles (linear interpolation between order statistics, as numpy's default) over the
    units of the experiment. `transpile` spells them exactly in each dialect (Trino: from ranks).
    """
    caps = percentile_caps(experiment)
    if not caps:
        return None
    columns = ", ".join(f"QUANTILE_CONT({col}, {level!r}) AS cap_{col}" for col, level in caps.items())
    return f"SELECT {columns}\nFROM per_unit\nWHERE NOT {_EXCLUDED}"


def _literal(value: float) -> str:
    # A string cast reads back exactly the double that repr() wrote, on every engine (a bare
    # 123.456 is a DECIMAL on Spark, a NUMERIC on some others).
    return f"CAST({quote(repr(float(value)))} AS DOUBLE)"


def _statistics(experiment: ExperimentConfig, caps: dict[str, str], source: str) -> str:
    """Step 3 (DuckDB dialect): sufficient statistics per variant and day from `per_unit`, caps given as
    SQL expressions per capped column (literals, or columns of a `caps` relation joined in `source`)."""
    capped_cols: list[str] = []
    for i, metric in enumerate(experiment.metrics):
        cols = [f"m{i}"] + ([f"c{i}"] if metric.cuped_window_seconds is not None else [])
        for col in cols:
            if metric.cap is not None and metric.cap.value is not None:
                capped_cols.append(f"LEAST({col}, {_literal(metric.cap.value)}) AS {col}")
            elif col in caps:
                capped_cols.append(f"LEAST({col}, {caps[col]}) AS {col}")
            else:
                capped_cols.append(col)
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
    nl = ",\n    "
    return f"""capped AS (
  SELECT variant, day, {', '.join(capped_cols)} FROM {source} WHERE NOT {_EXCLUDED}
)
SELECT variant, day, COUNT(*) AS n,
    {nl.join(stats)}
FROM capped
GROUP BY variant, day
UNION ALL
SELECT variant, CAST(NULL AS DATE) AS day, COUNT(*) AS n,
    {nl.join(nulls)}
FROM per_unit
WHERE {_EXCLUDED}
GROUP BY variant
"""


def statistics_query(experiment: ExperimentConfig, caps: Mapping[str, float | None]) -> str:
    """Step 3 (DuckDB dialect) over the table `per_unit`, with the caps of step 2 inlined as literals.

    A cap of None (no unit to take a percentile of) leaves its column uncapped.
    """
    literals = {col: _literal(value) for col, value in caps.items() if value is not None}
    return "WITH " + _statistics(experiment, literals, "per_unit")


def build_query(experiment: ExperimentConfig) -> str:
    """The three steps as one statement (DuckDB dialect): what `--sql` prints, for other engines.

    The caps come from a `caps` relation of one row instead of literals, so the statement runs as it
    is; engines that run the analysis themselves run the steps one by one (see `analysis_worker.engine`).
    """
    steps = _per_unit(experiment)
    head, last_select = steps.rsplit("\n)\nSELECT ", 1)
    text = f"{head}\n),\nper_unit AS (\n  SELECT {last_select}\n),\n"
    caps = caps_query(experiment)
    if caps is None:
        return text + _statistics(experiment, {}, "per_unit")
    refs = {col: f"caps.cap_{col}" for col in percentile_caps(experiment)}
    return text + f"caps AS (\n  {caps}\n),\n" + _statistics(experiment, refs, "per_unit CROSS JOIN caps")


class DialectError(ValueError):
    """A step of the analysis has no exact spelling in the requested dialect."""


def _exact_percentiles(tree: exp.Expression, dialect: str) -> exp.Expression:
    """Spell each exact percentile (DuckDB's QUANTILE_CONT) the way `dialect` computes it exactly.

    sqlglot would map it to PERCENTILE_APPROX on Spark and leave an aggregate PERCENTILE_CONT for
    BigQuery, where it is an analytic function only; Trino has no exact percentile at all, so
    there it is computed from ranks (`ranked_percentiles`).
    """
    found = list(tree.find_all(exp.PercentileCont))
    if not found or dialect == "duckdb":
        return tree
    if dialect == "trino":
        for select in {id(n.find_ancestor(exp.Select)): n.find_ancestor(exp.Select) for n in found}.values():
            select.replace(ranked_percentiles(select))
        return tree
    for node in found:
        if dialect == "spark":
            node.replace(exp.Anonymous(this="PERCENTILE", expressions=[node.this, node.expression]))
        elif dialect == "bigquery":
            node.replace(exp.Window(this=node.copy(), over="OVER"))
    if dialect == "bigquery":
        # The analytic form gives every row the same value: keep one.
        for select in {id(n.find_ancestor(exp.Select)): n.find_ancestor(exp.Select) for n in
                       tree.find_all(exp.Window)}.values():
            if select is not None:
                select.set("limit", exp.Limit(expression=exp.Literal.number(1)))
    return tree


def ranked_percentiles(select: exp.Select) -> exp.Select:
    """A `SELECT QUANTILE_CONT(col, p) AS name, ... FROM t WHERE w` as order statistics, for Trino.

    Trino has no exact percentile (only `approx_percentile`), so each one is computed from its
    definition: rank the values, take the ones at 0-based positions floor(h) and floor(h) + 1 for
    h = p (n - 1), interpolate linearly (numpy's default, DuckDB's QUANTILE_CONT, Spark's
    PERCENTILE). The ranking sorts all units of the experiment in one window.
    """
    source = f"FROM {select.find(exp.From).this.sql('duckdb')}"
    if select.args.get("where") is not None:
        source += f" WHERE {select.args['where'].this.sql('duckdb')}"
    columns = []
    for item in select.expressions:
        percentile = item.this
        if not isinstance(percentile, exp.PercentileCont):
            raise DialectError(f"cannot rank {item.sql('duckdb')}")
        col, level = percentile.this.sql("duckdb"), percentile.expression.sql("duckdb")
        at = "MAX(CASE WHEN rn = FLOOR(h) + 1 THEN v END)"
        after = f"COALESCE(MAX(CASE WHEN rn = FLOOR(h) + 2 THEN v END), {at})"
        columns.append(
            f"(SELECT {at} + MAX(h - FLOOR(h)) * ({after} - {at}) FROM (SELECT {col} AS v, "
            f"ROW_NUMBER() OVER (ORDER BY {col}) AS rn, {level} * (COUNT(*) OVER () - 1) AS h {source}) AS ranked) "
            f"AS {item.alias_or_name}")
    return sqlglot.parse_one(f"SELECT {', '.join(columns)}", read="duckdb")


def _epoch_micros(node: exp.Expression, dialect: str) -> exp.Expression:
    """DuckDB's EPOCH_US in the other dialects (sqlglot leaves it as it is)."""
    if not (isinstance(node, exp.Anonymous) and str(node.this).upper() == "EPOCH_US") or dialect == "duckdb":
        return node
    (column,) = node.expressions
    if dialect in ("spark", "bigquery"):
        return exp.Anonymous(this="UNIX_MICROS", expressions=[column])
    # Trino: seconds as a double; a microsecond timestamp of this century is within 0.2 us of it.
    seconds = exp.Anonymous(this="TO_UNIXTIME", expressions=[column])
    return exp.cast(exp.Round(this=exp.Mul(this=seconds, expression=exp.Literal.number(MICROS))), "BIGINT")


def transpile(query: str, dialect: str) -> str:
    """The same query in another engine's dialect (spark, bigquery, trino, duckdb).

    Raises `DialectError` when a step cannot be written exactly in that dialect.
    """
    if dialect not in DIALECTS:
        raise ValueError(f"unknown dialect {dialect!r}; one of {', '.join(DIALECTS)}")
    tree = sqlglot.parse_one(query, read="duckdb")
    # DuckDB's ANY_VALUE skips NULLs, so sqlglot spells it `ARBITRARY(x) IGNORE NULLS` for Trino
    # and `ANY_VALUE(x IGNORE NULLS)` for BigQuery, which neither accepts. The query only takes
    # ANY_VALUE of columns that are never NULL, so the plain function means the same everywhere.
    tree = tree.transform(
        lambda node: node.this if isinstance(node, exp.IgnoreNulls) and isinstance(node.this, exp.AnyValue) else node)
    tree = _exact_percentiles(tree, dialect)
    tree = tree.transform(lambda node: _epoch_micros(node, dialect))
    return tree.sql(dialect=dialect, pretty=True)
