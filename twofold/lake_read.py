"""How readers put a lake table in front of DuckDB, wherever the lake lives.

A local lake is read in place by DuckDB's own Parquet reader over the table's glob (the fastest
path, measured in `bench/analysis.py`). An object-store lake is listed through `pyarrow.fs` and
its files handed to DuckDB as a pyarrow dataset: DuckDB scans it with column projection and
filter pushdown, with the same credentials and endpoint as the writers (the `AWS_*` variables),
and without DuckDB's `httpfs` extension, which it would download at run time.

Only `<table>/date=*/*.parquet` is ever read: write-ahead logs, probes and temporary files
(hidden names) are invisible by construction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from twofold.lakestore import LakeStore, open_store


@dataclass(frozen=True)
class TableSource:
    """A table as a DuckDB FROM-clause item, and how many files it spans (0: the table is absent)."""

    sql: str
    files: int


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def table_source(con: Any, root: str | os.PathLike[str] | LakeStore, table: str,
                 hive_partitioning: bool = False, union_by_name: bool = False) -> TableSource | None:
    """Register what DuckDB needs to read `table` on `con`; None when the table has no file yet.

    `hive_partitioning` adds the `date` partition column (DATE) and `union_by_name` reads files
    whose columns differ (local lakes only: an object-store table is read with the contract's
    schema, which every reader here uses, missing columns as nulls).
    """
    import pyarrow.dataset as pads

    from twofold.lake import TABLE_SCHEMAS

    store = root if not isinstance(root, str | os.PathLike) else open_store(root)
    files = store.list_files(f"{table}/")
    # Names starting with `_` are skipped as Hadoop readers (Spark, Hive, Trino) skip them, so that
    # every engine reads the same files (hidden `.` names are never listed).
    files = [f for f in files if f.path.split("/")[1].startswith("date=")
             and not f.path.rsplit("/", 1)[-1].startswith("_")]
    if not files:
        return None
    if store.local and not hive_partitioning:
        pattern = os.path.join(store.full_path(table), "date=*", "*.parquet")
        options = "hive_partitioning = false"
        if union_by_name:
            options += ", union_by_name = true"
        return TableSource(f"read_parquet({_sql_string(pattern)}, {options})", len(files))
    if store.local:
        # The listed files themselves (DuckDB's glob would also read `.` and `_` names).
        listed = ", ".join(_sql_string(store.full_path(f.path)) for f in files)
        options = "hive_partitioning = true, hive_types = {'date': DATE}"
        if union_by_name:
            options += ", union_by_name = true"
        return TableSource(f"read_parquet([{listed}], {options})", len(files))
    schema = TABLE_SCHEMAS[table]
    partitioning = None
    if hive_partitioning:
        import pyarrow as pa

        schema = schema.append(pa.field("date", pa.date32()))
        partitioning = pads.partitioning(pa.schema([("date", pa.date32())]), flavor="hive")
    dataset = pads.dataset([store.full_path(f.path) for f in files], schema=schema, format="parquet",
                           filesystem=store.filesystem, partitioning=partitioning,
                           partition_base_dir=store.full_path(table) if hive_partitioning else None)
    name = f"__lake_{table}"
    con.register(name, dataset)
    return TableSource(name, len(files))
