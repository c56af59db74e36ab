"""A dict-backed materialization store: conformance tests, local evaluation, `--materializations memory`."""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterable, Sequence

from twofold.resolver.materializations import Key, MaterializationRecord, RecordKey


class InMemoryMaterializations:
    """First write wins, as in every store; a lock makes a write's check-and-insert atomic."""

    default_timeout = 1.0

    def __init__(self, records: Iterable[MaterializationRecord] = (), *, timeout: float | None = None) -> None:
        self.timeout = self.default_timeout if timeout is None else timeout
        self._entries: dict[Key, dict[str, str]] = {}
        self._lock = threading.Lock()
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

    def read(self, keys: Collection[Key]) -> dict[Key, dict[str, str]]:
        entries = self._entries
        with self._lock:
            return {k: dict(entries[k]) for k in keys if k in entries}

    def write(self, records: Sequence[MaterializationRecord]) -> dict[RecordKey, str]:
        stored: dict[RecordKey, str] = {}
        with self._lock:
            for r in records:
                entry = self._entries.setdefault((r.materialization, r.unit), {})
                stored[r.key] = entry.setdefault(r.rule, r.variant)
        return stored

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return "memory"

    def __len__(self) -> int:
        return sum(len(e) for e in self._entries.values())
