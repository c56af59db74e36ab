"""Materializations in Redis: one store shared by every replica of the assignment server.

Layout: one hash per (materialization, unit), `<prefix><len(materialization)>:<materialization>:<unit>`,
whose fields are rule names and values variants (the empty field only records membership).
A read is one pipelined HGETALL per key; a write is HSETNX + HGET per record in one pipeline,
so the first writer wins and every writer learns what is stored, in a single round trip.

Calls are blocking (redis-py with a bounded connection pool) and fail fast: socket and pool
timeouts equal the store timeout and there are no client-side retries, because the server
serves without the store rather than wait (docs/assignment.md, "Materializations").
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from twofold.resolver.materializations import Key, MaterializationRecord, RecordKey

DEFAULT_PREFIX = "twofold:mat:"


def redact(url: str) -> str:
    """The URL without its password (safe to log)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.username:
        netloc = f"{parts.username}:***@{netloc}"
    else:
        netloc = f":***@{netloc}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class RedisMaterializations:
    """A Redis (or Redis-compatible: Valkey, managed services) store. TLS with `rediss://`."""

    default_timeout = 0.25  # a network hop: beyond this, serve without the store (and count it)

    def __init__(self, url: str, *, password: str | None = None, timeout: float | None = None,
                 max_connections: int = 32, prefix: str = DEFAULT_PREFIX) -> None:
        self.url = url
        self.prefix = prefix
        self.timeout = self.default_timeout if timeout is None else timeout
        extra: dict[str, object] = {}
        if password:
            extra["password"] = password
        ca = os.environ.get("TWOFOLD_MATERIALIZATIONS_CA")
        if ca and url.startswith("rediss://"):
            extra["ssl_ca_certs"] = ca
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=self.timeout, socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout, retry=Retry(NoBackoff(), 0), retry_on_timeout=False,
            decode_responses=True, client_name="twofold-assignment", **extra)
        self._client = redis.Redis(connection_pool=pool)

    def _key(self, materialization: str, unit: str) -> str:
        return f"{self.prefix}{len(materialization)}:{materialization}:{unit}"

    def read(self, keys: Collection[Key]) -> dict[Key, dict[str, str]]:
        keys = list(keys)
        try:
            if len(keys) == 1:  # the common case: one command, no pipeline bookkeeping
                entry = self._client.hgetall(self._key(*keys[0]))
                return {keys[0]: entry} if entry else {}
            pipe = self._client.pipeline(transaction=False)
            for materialization, unit in keys:
                pipe.hgetall(self._key(materialization, unit))
            return {k: v for k, v in zip(keys, pipe.execute(), strict=True) if v}
        except redis.TimeoutError as exc:
            raise TimeoutError(f"redis read: {exc}") from exc

    def write(self, records: Sequence[MaterializationRecord]) -> dict[RecordKey, str]:
        if not records:
            return {}
        pipe = self._client.pipeline(transaction=False)
        for r in records:
            key = self._key(r.materialization, r.unit)
            pipe.hsetnx(key, r.rule, r.variant)
            pipe.hget(key, r.rule)
        try:
            replies = pipe.execute()
        except redis.TimeoutError as exc:
            raise TimeoutError(f"redis write: {exc}") from exc
        return {r.key: str(replies[2 * i + 1]) for i, r in enumerate(records)}

    def close(self) -> None:
        self._client.close()
        self._client.connection_pool.disconnect()

    def describe(self) -> str:
        return redact(self.url)
