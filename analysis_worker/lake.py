"""Read-only access to the lake (contract 3) through DuckDB, which reads the Parquet files in place.

The tables are exposed to the metric SQL as views named `exposures` and `events` (plus the Hive
partition column `date`), so the query itself never mentions paths and reads the same on Spark or
Trino. Only
`<root>/<table>/date=*/*.parquet` is read: the write-ahead log under `<root>/_wal/` and the
temporary `.*.tmp` files of a compaction in progress are invisible by construction. The root is a
folder or an object-store URL (`s3://bucket/prefix`); `twofold.lake_read` says how each is read.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import duckdb

from twofold.lake_read import table_source
from twofold.lakestore import LakeStoreError, open_store

TABLE_COLUMNS: dict[str, str] = {
    "exposures": ("exposure_id VARCHAR, ts TIMESTAMPTZ, unit VARCHAR, flag VARCHAR, rule VARCHAR, variant VARCHAR, "
                  "assignment_id VARCHAR, resolve_id VARCHAR, client VARCHAR, date DATE"),
    "events": ("event_id VARCHAR, ts TIMESTAMPTZ, unit VARCHAR, name VARCHAR, value DOUBLE, properties VARCHAR, "
               "date DATE"),
}


class LakeError(RuntimeError):
    """The lake cannot be read (missing folder or table, unreadable file)."""


@dataclass(frozen=True)
class LakeTables:
    """Which tables were found, and the DuckDB connection whose views expose them."""

    connection: duckdb.DuckDBPyConnection
    present: dict[str, bool]
    files: dict[str, int]


def table_pattern(root: str | os.PathLike[str], table: str) -> str:
    """The glob of a table's Parquet files (Hive partitions by date)."""
    return os.path.join(os.fspath(root), table, "date=*", "*.parquet")


def table_files(root: str | os.PathLike[str], table: str) -> list[str]:
    """The table's Parquet files as every engine reads them (`twofold.lake_read.table_source`'s list):
    under `date=*/`, none whose name starts with `.` or `_` (as Hadoop readers skip them)."""
    store = open_store(root)
    return [store.full_path(f.path) for f in store.list_files(f"{table}/")
            if f.path.split("/")[1].startswith("date=") and not f.path.rsplit("/", 1)[-1].startswith("_")]


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def default_threads(con: duckdb.DuckDBPyConnection) -> int:
    """One thread more than DuckDB's own default (the cores it sees, cgroup limits included).

    Measured on the 2-core VM with the benchmark's 10M-exposure lake: the query took 10.3-10.7 s
    with 2 threads, 9.4-9.7 s with 3 or 4 and 9.5-10.0 s with 6 or 8, and 3 threads used less CPU
    in all (16.4 against 17.8-18.3 s user) as well as less wall time. Why is not established; the
    hash aggregates split their work by thread count, which is one candidate.
    """
    (cores,) = con.execute("SELECT current_setting('threads')").fetchone() or (1,)
    return int(cores) + 1


def open_lake(root: str | os.PathLike[str], *, threads: int | None = None,
              memory_limit: str | None = None) -> LakeTables:
    """A DuckDB connection with `exposures` and `events` views over the lake at `root`.

    `threads` defaults to `default_threads`. A missing table becomes an empty view with the right
    columns (so the query still runs and the caller decides what to report); `present` says which
    tables really exist.
    """
    try:
        store = open_store(root)
    except LakeStoreError as exc:
        raise LakeError(str(exc)) from exc
    if store.local and not Path(store.full_path("")).is_dir():
        raise LakeError(f"lake folder {os.fspath(root)!r} does not exist")
    con = duckdb.connect(database=":memory:")
    con.execute("SET TimeZone = 'UTC'")
    # Row order never matters to an aggregation; not preserving it lets DuckDB stream with less memory.
    con.execute("SET preserve_insertion_order = false")
    if threads is None:
        threads = default_threads(con)
    con.execute(f"SET threads = {int(threads)}")
    if memory_limit is not None:
        # Beyond the limit DuckDB spills its hash tables to disk instead of failing.
        spill = Path(tempfile.gettempdir()) / "twofold-duckdb-spill"
        spill.mkdir(parents=True, exist_ok=True)
        con.execute(f"SET memory_limit = {_sql_string(memory_limit)}")
        con.execute(f"SET temp_directory = {_sql_string(str(spill))}")
    present: dict[str, bool] = {}
    files: dict[str, int] = {}
    for table, columns in TABLE_COLUMNS.items():
        try:
            source = table_source(con, store, table, hive_partitioning=True)
        except OSError as exc:  # an object store that refuses the listing (credentials, no bucket)
            raise LakeError(f"cannot list the lake {os.fspath(root)!r}: {exc}") from exc
        present[table] = source is not None
        files[table] = source.files if source else 0
        if source is not None:
            select_list = ", ".join(c.split()[0] for c in columns.split(", "))
            # `date` is the Hive partition of the file: a predicate on it skips whole days unread.
            con.execute(f"CREATE VIEW {table} AS SELECT {select_list} FROM {source.sql}")
        else:
            casts = ", ".join(f"CAST(NULL AS {c.split()[1]}) AS {c.split()[0]}" for c in columns.split(", "))
            con.execute(f"CREATE VIEW {table} AS SELECT {casts} WHERE FALSE")
    return LakeTables(connection=con, present=present, files=files)


def row_count(con: duckdb.DuckDBPyConnection, table: str) -> int:
    """Rows of a table (DuckDB answers COUNT(*) from the Parquet footers)."""
    row = con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
    return int(row[0]) if row else 0
