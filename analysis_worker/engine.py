"""Which engine runs the metric SQL: one small interface, one module per engine.

DuckDB (`analysis_worker.engine_duckdb`) reads the lake in place on one machine and is the
default; Spark (`analysis_worker.engine_spark`, the `spark` extra) runs the same SQL where a lake
of billions of exposures lives. Both get the same statements from `analysis_worker.sql`
and return plain rows, which the same code turns into the same statistics:

1. `per_unit_query`: one row per exposed unit, kept by the engine as the table `per_unit`
   (DuckDB: a temporary table; Spark: a cached view), so that the next two steps read it
   instead of the lake;
2. `caps_query` (only with percentile caps): the exact percentiles, one row;
3. `statistics_query`: sums per variant and day, the caps of step 2 inlined as literals;
4. `null_rows_query`: the rows left out for a NULL unit or id, counted.

An engine takes the statements in DuckDB's dialect and translates them itself (`sql.transpile`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol

ENGINES = ("duckdb", "spark")


class LakeSession(Protocol):
    """An open lake on one engine: tables `exposures` and `events` (with the partition column `date`)."""

    #: Which tables exist in the lake (a missing one reads as empty).
    present: Mapping[str, bool]

    def rows(self, query: str) -> list[dict[str, Any]]:
        """Run a DuckDB-dialect query, return its rows as dicts; `LakeError` naming the cause on failure."""
        ...

    def materialize(self, name: str, query: str) -> None:
        """Run a DuckDB-dialect query once and keep its result as the table `name` for this session."""
        ...

    def row_count(self, table: str) -> int:
        """Rows of a lake table, all partitions (what the results call `rows_scanned`)."""
        ...

    def close(self) -> None:
        """Drop what `materialize` kept; the engine itself stays usable."""
        ...


class Engine(Protocol):
    """What runs the analysis's SQL. `open` raises `analysis_worker.lake.LakeError` for an unreadable lake."""

    name: str

    def open(self, lake: str | os.PathLike[str]) -> LakeSession: ...

    def close(self) -> None:
        """Release the engine (Spark: stop the session it started)."""
        ...


def make_engine(name: str = "duckdb", *, threads: int | None = None, memory_limit: str | None = None,
                spark_master: str | None = None, spark_conf: Mapping[str, str] | None = None) -> Engine:
    """An engine by name, with the options that engine takes (the others must be left unset).

    DuckDB: `threads`, `memory_limit`. Spark: `spark_master` (`local[*]` by default, `spark://…`,
    `yarn`, `k8s://…`, or a Spark Connect URL `sc://…`) and `spark_conf` (extra Spark settings).
    """
    if name == "duckdb":
        if spark_master is not None or spark_conf:
            raise ValueError("--spark-master and --spark-conf need --engine spark")
        from analysis_worker.engine_duckdb import DuckDBEngine

        return DuckDBEngine(threads=threads, memory_limit=memory_limit)
    if name == "spark":
        if threads is not None or memory_limit is not None:
            raise ValueError("--threads and --memory-limit are DuckDB settings; give Spark its own with "
                             "--spark-conf (e.g. spark.driver.memory=4g)")
        from analysis_worker.engine_spark import SparkEngine

        return SparkEngine(master=spark_master, conf=spark_conf)
    raise ValueError(f"unknown engine {name!r}; one of {', '.join(ENGINES)}")
