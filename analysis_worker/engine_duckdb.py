"""The DuckDB engine: the lake's Parquet read in place by an in-process DuckDB (the default)."""

from __future__ import annotations

import os
from typing import Any

import duckdb

from analysis_worker.lake import LakeError, LakeTables, open_lake, row_count


class DuckDBLake:
    """One analysis's connection; `materialize` keeps a temporary table (it spills past the memory limit)."""

    def __init__(self, tables: LakeTables) -> None:
        self._tables = tables
        self.present = tables.present
        self.connection = tables.connection

    def rows(self, query: str) -> list[dict[str, Any]]:
        try:
            cursor = self._tables.connection.execute(query)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]
        except duckdb.Error as exc:
            raise LakeError(str(exc)) from exc

    def materialize(self, name: str, query: str) -> None:
        try:
            self._tables.connection.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS {query}")
        except duckdb.Error as exc:
            raise LakeError(str(exc)) from exc

    def row_count(self, table: str) -> int:
        try:
            return row_count(self._tables.connection, table)
        except duckdb.Error as exc:
            raise LakeError(str(exc)) from exc

    def close(self) -> None:
        self._tables.connection.close()


class DuckDBEngine:
    """`threads` and `memory_limit` as `analysis_worker.lake.open_lake` takes them."""

    name = "duckdb"

    def __init__(self, *, threads: int | None = None, memory_limit: str | None = None) -> None:
        self.threads = threads
        self.memory_limit = memory_limit

    def open(self, lake: str | os.PathLike[str]) -> DuckDBLake:
        return DuckDBLake(open_lake(lake, threads=self.threads, memory_limit=self.memory_limit))

    def close(self) -> None:
        """Nothing to release: each analysis has its own connection."""
