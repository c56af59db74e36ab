"""Materializations in one SQLite file (WAL journal): the server's durable embedded default.

Several processes on one machine may share the file: a write is one IMMEDIATE transaction that
inserts with `ON CONFLICT DO NOTHING` and reads back what is stored, so the first writer wins
and every writer learns the winner.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Collection, Sequence
from pathlib import Path

from twofold.resolver.materializations import Key, MaterializationRecord, RecordKey


class SqliteMaterializations:
    """One connection per thread (the server calls it from a small thread pool)."""

    default_timeout = 5.0  # a local file: a slow call is a busy disk, not an outage

    def __init__(self, path: str | Path, *, timeout: float | None = None, busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        self.timeout = self.default_timeout if timeout is None else timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._conn().execute(
            "CREATE TABLE IF NOT EXISTS materializations ("
            " materialization TEXT NOT NULL, unit TEXT NOT NULL, rule TEXT NOT NULL,"
            " variant TEXT NOT NULL, PRIMARY KEY (materialization, unit, rule)) WITHOUT ROWID")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def read(self, keys: Collection[Key]) -> dict[Key, dict[str, str]]:
        conn = self._conn()
        found: dict[Key, dict[str, str]] = {}
        for key in keys:
            rows = conn.execute("SELECT rule, variant FROM materializations WHERE materialization = ? AND unit = ?",
                                key).fetchall()
            if rows:
                found[key] = {str(rule): str(variant) for rule, variant in rows}
        return found

    def write(self, records: Sequence[MaterializationRecord]) -> dict[RecordKey, str]:
        if not records:
            return {}
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT INTO materializations (materialization, unit, rule, variant) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (materialization, unit, rule) DO NOTHING",
                [(r.materialization, r.unit, r.rule, r.variant) for r in records])
            stored = {}
            for r in records:
                row = conn.execute("SELECT variant FROM materializations"
                                   " WHERE materialization = ? AND unit = ? AND rule = ?", r.key).fetchone()
                stored[r.key] = str(row[0])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return stored

    def close(self) -> None:
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
        self._local = threading.local()

    def describe(self) -> str:
        return f"sqlite:{self.path}"
