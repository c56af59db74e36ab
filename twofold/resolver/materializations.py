"""Materializations (sticky assignments) behind a small store interface.

A rule may *write* the variant a unit got into a named materialization, and a rule may *read*
one: a unit found there keeps its stored variant even after the rule's targeting or
allocation changed. The resolver only calls the three methods of `MaterializationStore`;
the in-memory store serves tests and local evaluation, `SqliteMaterializations` is the durable
embedded default of the assignment server (one file, WAL journal, survives restarts).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class MaterializationRecord:
    """`unit` is in `materialization`; with a `rule`, the variant it was given by that rule."""

    unit: str
    materialization: str
    rule: str = ""
    variant: str = ""


@runtime_checkable
class MaterializationStore(Protocol):
    def contains(self, materialization: str, unit: str) -> bool:
        """Whether the unit is in the materialization at all."""
        ...

    def variant(self, materialization: str, unit: str, rule: str) -> str | None:
        """The variant stored for the unit by `rule`, if any."""
        ...

    def write(self, records: Sequence[MaterializationRecord]) -> None:
        """Store records; a record for an existing (materialization, unit, rule) replaces it."""
        ...


class InMemoryMaterializations:
    """A dict-backed store; thread-safe enough for the GIL (single dict operations)."""

    def __init__(self, records: Iterable[MaterializationRecord] = ()) -> None:
        self._units: set[tuple[str, str]] = set()
        self._variants: dict[tuple[str, str, str], str] = {}
        self.write(list(records))

    @classmethod
    def from_spec(cls, doc: dict | None) -> InMemoryMaterializations:
        """From the conformance layout `{unit: {materialization: {isUnitInMaterialization, ruleToVariant}}}`."""
        records = []
        for unit, mats in (doc or {}).items():
            for name, spec in mats.items():
                if not spec.get("isUnitInMaterialization"):
                    continue
                records.append(MaterializationRecord(unit, name))
                for rule, variant in (spec.get("ruleToVariant") or {}).items():
                    records.append(MaterializationRecord(unit, name, rule, variant))
        return cls(records)

    def contains(self, materialization: str, unit: str) -> bool:
        return (materialization, unit) in self._units

    def variant(self, materialization: str, unit: str, rule: str) -> str | None:
        return self._variants.get((materialization, unit, rule))

    def write(self, records: Sequence[MaterializationRecord]) -> None:
        for r in records:
            self._units.add((r.materialization, r.unit))
            if r.rule:
                self._variants[(r.materialization, r.unit, r.rule)] = r.variant

    def __len__(self) -> int:
        return len(self._variants) + len(self._units)


class SqliteMaterializations:
    """Durable store in one SQLite file (WAL mode): the server's default."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._conn() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS materializations ("
                " materialization TEXT NOT NULL, unit TEXT NOT NULL, rule TEXT NOT NULL,"
                " variant TEXT NOT NULL, PRIMARY KEY (materialization, unit, rule)) WITHOUT ROWID")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
        return conn

    def contains(self, materialization: str, unit: str) -> bool:
        row = self._conn().execute(
            "SELECT 1 FROM materializations WHERE materialization = ? AND unit = ? LIMIT 1",
            (materialization, unit)).fetchone()
        return row is not None

    def variant(self, materialization: str, unit: str, rule: str) -> str | None:
        row = self._conn().execute(
            "SELECT variant FROM materializations WHERE materialization = ? AND unit = ? AND rule = ?",
            (materialization, unit, rule)).fetchone()
        return None if row is None else str(row[0])

    def write(self, records: Sequence[MaterializationRecord]) -> None:
        if not records:
            return
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT INTO materializations (materialization, unit, rule, variant) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (materialization, unit, rule) DO UPDATE SET variant = excluded.variant",
                [(r.materialization, r.unit, r.rule, r.variant) for r in records])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
