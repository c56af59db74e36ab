"""Materializations (sticky assignments): one small store interface, one module per backend.

A rule may *write* the variant a unit got into a named materialization, and a rule may *read*
one: a unit found there keeps its stored variant even after the rule's targeting or
allocation changed. Stores are keyed per (materialization, unit); each key holds a small map
rule -> variant (the empty rule only records that the unit is in the materialization).

Every store keeps the **first write**: a record for a (materialization, unit, rule) that is
already stored is not written again, and `write` returns what the store holds, so a resolve
that lost a race serves the winner's variant (see `twofold.resolver.sticky`). Because a stored
entry never changes, callers may cache what they read.

Backends: `memory` (tests, local evaluation), `sqlite` (the server's embedded default, one file
shared by the processes of one machine) and `redis` (shared by every replica; needs the
`redis` extra). `open_store` picks one from a `--materializations` spec.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

Key = tuple[str, str]
"""(materialization, unit)."""
RecordKey = tuple[str, str, str]
"""(materialization, unit, rule)."""


@dataclass(frozen=True, slots=True)
class MaterializationRecord:
    """`unit` is in `materialization`; with a `rule`, the variant it was given by that rule."""

    unit: str
    materialization: str
    rule: str = ""
    variant: str = ""

    @property
    def key(self) -> RecordKey:
        return (self.materialization, self.unit, self.rule)


@runtime_checkable
class MaterializationStore(Protocol):
    """What the resolver needs of a store: a batched read and a first-write-wins write.

    Both are blocking calls (the asyncio server runs them in a thread pool); each is one round
    trip to the backend however many keys it carries.
    """

    timeout: float
    """Seconds the server waits for one call before serving without the store."""

    def read(self, keys: Collection[Key]) -> dict[Key, dict[str, str]]:
        """For each key the store holds, its `{rule: variant}`; keys it does not hold are left out."""
        ...

    def write(self, records: Sequence[MaterializationRecord]) -> dict[RecordKey, str]:
        """Insert the records whose key is new; return the variant stored under every record's key
        after the write (an earlier writer's where this insert lost)."""
        ...

    def close(self) -> None:
        ...

    def describe(self) -> str:
        """Where the store is, fit for logs (never a password)."""
        ...


def open_store(spec: str, *, password: str | None = None, timeout: float | None = None) -> MaterializationStore:
    """The store a `--materializations` spec names: `memory`, `redis://` / `rediss://` URL, or a SQLite path.

    A Redis password may come in `password` (or `TWOFOLD_MATERIALIZATIONS_PASSWORD`) rather than
    in the URL, so the URL can be logged and passed around without it.
    """
    if spec == "memory":
        from twofold.resolver.materializations.memory import InMemoryMaterializations

        return InMemoryMaterializations(timeout=timeout)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        from twofold.resolver.materializations.redis import RedisMaterializations

        return RedisMaterializations(spec, timeout=timeout,
                                     password=password or os.environ.get("TWOFOLD_MATERIALIZATIONS_PASSWORD"))
    if "://" in spec:
        raise ValueError(f"unsupported materialization store {spec.split('://')[0]}:// "
                         "(use a SQLite path, 'memory', redis:// or rediss://)")
    from twofold.resolver.materializations.sqlite import SqliteMaterializations

    return SqliteMaterializations(Path(spec), timeout=timeout)


from twofold.resolver.materializations.memory import InMemoryMaterializations  # noqa: E402
from twofold.resolver.materializations.sqlite import SqliteMaterializations  # noqa: E402

__all__ = [
    "InMemoryMaterializations",
    "Key",
    "MaterializationRecord",
    "MaterializationStore",
    "RecordKey",
    "SqliteMaterializations",
    "open_store",
]
