"""Breakdowns by segment: every metric per value of an exposure dimension (country, platform, ...).

The assignment server records, with each exposure, the evaluation-context attributes its flag
declares as dimensions (the `dimensions` JSON column of `exposures`; files written before that
column existed read as null). A unit's segment is its value at its *first* exposure, so each unit
belongs to exactly one segment and segments partition the experiment.

For each of the largest segments (`MAX_SEGMENTS` per dimension, by units) the experiment's own
sufficient-statistics steps (`analyze.sufficient_statistics`) run again with `exposures` narrowed
to the segment's units, and the variants are compared with `breakdowns.subset_effects` (the same
estimators, nominal intervals). Reusing the one set of queries keeps one definition of every
metric; the price is one run per segment shown, paid only by experiments that name `dimensions`.
Percentile caps are computed within the segment. Segments run on the DuckDB engine (the default);
on another engine the document says they were not computed. These are descriptive: with S
segments and M metrics, about alpha x S x M comparisons come out "significant" by chance, which
the document says next to them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb

from analysis_worker.breakdowns import subset_effects, top_values
from analysis_worker.config import ExperimentConfig
from analysis_worker.inputs import StatsInput
from analysis_worker.sql import MULTIPLE, UNKNOWN, quote, timestamp
from twofold.lake_read import table_source
from twofold.lakestore import open_store

log = logging.getLogger("twofold.analysis.segments")

MAX_SEGMENTS = 6
MISSING = "(missing)"


def _note(config: ExperimentConfig, shown: int) -> str:
    comparisons = shown * len(config.metrics) * max(1, len(config.split) - 1)
    return (f"{comparisons} segment comparisons at nominal alpha {config.alpha:g}, without correction: about "
            f"{config.alpha * comparisons:.1f} would look significant by chance alone. Read them as a search for "
            "differences to confirm in a new experiment, not as results; the recommendation rests on the "
            "whole experiment.")


def segment_breakdowns(session: Any, lake: str | Path, config: ExperimentConfig,
                       statistics: Callable[[Any, ExperimentConfig], list[dict[str, Any]]],
                       to_input: Callable[[ExperimentConfig, list[dict[str, Any]]], StatsInput]
                       ) -> dict[str, Any]:
    """The `segments` block of the results document (empty dimensions list when none are named).

    `session` is the analysis's open lake (a DuckDB session with a `connection`); `statistics`
    runs the experiment's sufficient-statistics steps on it and returns the rows per variant and day.
    """
    if not config.dimensions:
        return {"dimensions": []}
    con = getattr(session, "connection", None)
    if not isinstance(con, duckdb.DuckDBPyConnection):
        return {"dimensions": [], "error": "segment breakdowns need the DuckDB engine (the default)"}
    flags = ", ".join(quote(f) for f in config.flag_names())
    where = [f"flag IN ({flags})", f"ts >= {timestamp(config.start)}"]
    if config.end is not None:
        where.append(f"ts < {timestamp(config.end)}")
    try:
        # union_by_name: older files without the column read as null instead of failing.
        # The same source as the lake's `exposures` view (on an object store it re-registers the very
        # dataset that view reads, so the two must agree, partition column included).
        source = table_source(con, open_store(lake), "exposures", hive_partitioning=True, union_by_name=True)
        if source is None:
            return {"dimensions": []}
        con.execute("CREATE OR REPLACE TEMP VIEW exposure_dimensions AS SELECT unit, flag, ts, dimensions "
                    f"FROM {source.sql}")
        con.execute("SELECT dimensions FROM exposure_dimensions LIMIT 0")
    except (duckdb.Error, OSError):
        return {"dimensions": [], "error": "no exposure in the lake records dimensions (the flag must declare "
                                           "them: `dimensions: [...]` in its YAML)"}
    con.execute("ALTER VIEW exposures RENAME TO exposures_all")
    out: list[dict[str, Any]] = []
    shown_total = 0
    try:
        for dim in config.dimensions:
            path = quote("$." + '"' + dim.replace('"', '') + '"')
            con.execute(f"""CREATE OR REPLACE TEMP TABLE unit_segments AS
                SELECT unit, ARG_MIN(COALESCE(json_extract_string(dimensions, {path}), {quote(MISSING)}), ts)
                       AS segment
                FROM exposure_dimensions WHERE {' AND '.join(where)} GROUP BY unit""")
            counts = [(str(v), int(n)) for v, n in
                      con.execute("SELECT segment, COUNT(*) FROM unit_segments GROUP BY segment").fetchall()]
            shown, left_out = top_values(counts, MAX_SEGMENTS)
            values = []
            for value in shown:
                con.execute("CREATE OR REPLACE TEMP VIEW exposures AS SELECT x.* FROM exposures_all AS x "
                            f"WHERE x.unit IN (SELECT unit FROM unit_segments WHERE segment = {quote(value)})")
                rows = [r for r in statistics(session, config) if r["variant"] not in (MULTIPLE, UNKNOWN)]
                values.append({"value": value, **subset_effects(config, rows, to_input)})
            shown_total += len(values)
            total = sum(n for _, n in counts)
            out.append({"dimension": dim, "values": values, "other_values": left_out,
                        "other_units": total - sum(n for v, n in counts if v in shown)})
    finally:
        con.execute("DROP VIEW IF EXISTS exposures")
        con.execute("ALTER VIEW exposures_all RENAME TO exposures")
    return {"dimensions": out, "max_segments": MAX_SEGMENTS, "note": _note(config, shown_total)}
