"""Resolving against a materialization store: batched reads, first-write-wins writes, a cache.

The resolver core does no I/O. A resolve that touches stored assignments runs as passes over a
`StoreView`: a pass answers from what the view knows (this resolve's reads, then the cache of
stored entries) and notes every key it is missing; the caller reads all missing keys in one
batch and the resolve passes again. Its sticky assignments are then written conditionally
(first write wins). Where an insert lost to another writer (another replica, a concurrent
request), the resolve passes once more with the winner's variant, so what it serves is what
the store holds.

`resolve_steps` is a generator that yields the I/O it needs (`ReadKeys`, `WriteRecords`) and
receives the answers, so the synchronous `Resolver.resolve_request` and the asyncio assignment
server drive one piece of logic. An answer of `None` means the store failed: the missing keys
count as absent and nothing is written (the server's documented degraded mode).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twofold.resolver.materializations import Key, MaterializationRecord, MaterializationStore, RecordKey

if TYPE_CHECKING:
    from twofold.resolver.resolve import Resolution, Resolver

MAX_PASSES = 8
"""Passes per resolve; each adds what the store holds for the keys the last pass missed (in
practice 1 for a cached unit, 2 to 3 otherwise), so this bound is never reached by real states."""

_UNKNOWN: Any = object()


class MaterializationCache:
    """A bounded LRU of stored entries, `(materialization, unit) -> {rule: variant}`.

    Safe because stores keep the first write: a stored (materialization, unit, rule) never
    changes, so a cached rule's variant is final. A rule missing from a cached entry may have
    been written since, so the view reads it again. Thread-safe (a lock per operation).
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[Key, dict[str, str]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Key) -> dict[str, str] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def learn(self, key: Key, fields: dict[str, str]) -> None:
        if self.capacity <= 0 or not fields:
            return
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._entries[key] = dict(fields)
                if len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
            else:
                self._entries.move_to_end(key)
                for rule, variant in fields.items():
                    entry.setdefault(rule, variant)

    def __len__(self) -> int:
        return len(self._entries)


class StoreView:
    """What one resolve knows of the store; the resolver's `contains` / `variant` lookups."""

    __slots__ = ("cache", "known", "missing")

    def __init__(self, cache: MaterializationCache | None = None) -> None:
        self.cache = cache
        self.known: dict[Key, dict[str, str] | None] = {}  # None: read, and not in the store
        self.missing: set[Key] = set()

    def contains(self, materialization: str, unit: str) -> bool:
        key = (materialization, unit)
        entry = self.known.get(key, _UNKNOWN)
        if entry is _UNKNOWN:
            if self.cache is not None and self.cache.get(key) is not None:
                return True
            self.missing.add(key)
            return False
        return entry is not None

    def variant(self, materialization: str, unit: str, rule: str) -> str | None:
        key = (materialization, unit)
        entry = self.known.get(key, _UNKNOWN)
        if entry is _UNKNOWN:
            cached = self.cache.get(key) if self.cache is not None else None
            if cached is not None and rule in cached:
                return cached[rule]
            self.missing.add(key)
            return None
        return None if entry is None else entry.get(rule)

    def stored(self, record: MaterializationRecord) -> str | None:
        """The variant known to be stored under the record's key, if any."""
        key = (record.materialization, record.unit)
        entry = self.known.get(key)
        if entry is not None and record.rule in entry:
            return entry[record.rule]
        cached = self.cache.get(key) if self.cache is not None else None
        return cached.get(record.rule) if cached is not None else None

    def take_missing(self) -> list[Key]:
        missing = sorted(self.missing)
        self.missing.clear()
        return missing

    def learn_read(self, keys: list[Key], found: dict[Key, dict[str, str]] | None) -> None:
        for key in keys:
            entry = None if found is None else found.get(key)
            self.known[key] = entry
            if entry and self.cache is not None:
                self.cache.learn(key, entry)

    def learn_written(self, stored: dict[RecordKey, str]) -> None:
        for (materialization, unit, rule), variant in stored.items():
            key = (materialization, unit)
            if key in self.known:  # a key this resolve never read stays unknown (read if needed)
                entry = self.known[key]
                if entry is None:
                    entry = self.known[key] = {}
                entry[rule] = variant
            if self.cache is not None:
                self.cache.learn(key, {rule: variant})


@dataclass(frozen=True, slots=True)
class ReadKeys:
    keys: list[Key]


@dataclass(frozen=True, slots=True)
class WriteRecords:
    records: list[MaterializationRecord]


StoreCall = ReadKeys | WriteRecords


def resolve_steps(resolver: Resolver, flag_names: list[str], evaluation_context: dict, client_secret: str,
                  cache: MaterializationCache | None = None,
                  ) -> Generator[StoreCall, dict | None, Resolution]:
    """Resolve, yielding the store calls needed; send back each call's answer (None: it failed).

    Raises what `Resolver.resolve_request` raises (unknown client, too many flags) before the
    first yield. A resolve whose flags touch no materialization yields nothing.
    """
    view = StoreView(cache)
    resolution = resolver.resolve_pass(flag_names, evaluation_context, client_secret, view)
    for _ in range(MAX_PASSES):
        if view.missing:
            keys = view.take_missing()
            found = yield ReadKeys(keys)
            view.learn_read(keys, found)
        else:
            pending = [r for r in resolution.materializations_to_write if view.stored(r) is None]
            if not pending:
                return resolution
            stored = yield WriteRecords(pending)
            if stored is None:
                return resolution  # served as computed; the next resolve writes it
            view.learn_written(stored)
            if all(stored.get(r.key) == r.variant for r in pending):
                return resolution
            # An insert lost: pass again so the stored (winning) variant is what is served.
        resolution = resolver.resolve_pass(flag_names, evaluation_context, client_secret, view)
    return resolution


def run_sync(steps: Generator[StoreCall, dict | None, Resolution], store: MaterializationStore) -> Resolution:
    """Drive `resolve_steps` with blocking calls to `store` (errors propagate)."""
    try:
        call = next(steps)
        while True:
            answer = store.read(call.keys) if isinstance(call, ReadKeys) else store.write(call.records)
            call = steps.send(answer)
    except StopIteration as done:
        return done.value
