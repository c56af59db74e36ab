"""The assignment server's side of sticky assignments: store calls off the event loop, bounded in time.

The resolver core yields the store calls a resolve needs (`twofold.resolver.sticky`); this
module makes them: in a small thread pool (stores are blocking clients), each within the store
timeout and the call's own gRPC deadline, with a per-pod cache of stored entries in front.

When a call fails or times out, the resolve goes on without the store (documented in
docs/assignment.md, "Materializations"): units not in this pod's cache are served as a new unit
would be (the rule's current allocation; for an unchanged rule that is the variant they had)
and nothing is written; the next resolve of the unit after the store is back reads and writes
as usual. After `failures_to_open` failures in a row the store is not called for `retry_after`
seconds (a circuit breaker), so an outage costs a few timeouts per pod per interval, not one per
request; the first call after the interval probes it again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from twofold import loop_metrics
from twofold.resolver import MaterializationCache, MaterializationStore, Resolution, Resolver, resolve_steps
from twofold.resolver.resolve import normalize_request
from twofold.resolver.sticky import ReadKeys, StoreCall

log = logging.getLogger("twofold.assignment")

OPS = ("read", "write")
OUTCOMES = ("ok", "timeout", "error", "skipped")
CALLS = loop_metrics.counter(
    "twofold_assignment_materialization_calls",
    "Materialization store calls by outcome: ok, timeout, error, or skipped while the store is "
    "considered down (each non-ok call is a resolve served without the store).",
    ["op", "outcome"])
LATENCY = loop_metrics.histogram(
    "twofold_assignment_materialization_seconds", "Materialization store call latency (ok, timeout, error).",
    ["op"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
for _op in OPS:  # every series exists from the start, so alerts on rates see zeros, not gaps
    LATENCY.labels(_op)
    for _outcome in OUTCOMES:
        CALLS.labels(_op, _outcome)

DEADLINE_MARGIN = 0.02
"""Seconds kept from the caller's deadline for resolving and answering after a store call."""


class StickyStore:
    """A store as the servicer uses it: cached, off the loop, within time, failing open."""

    def __init__(self, store: MaterializationStore, *, timeout: float | None = None, cache_size: int = 100_000,
                 retry_after: float = 1.0, failures_to_open: int = 3, threads: int = 16) -> None:
        self.store = store
        self.timeout = store.timeout if timeout is None else timeout
        self.cache = MaterializationCache(cache_size)
        self.retry_after = retry_after
        self.failures_to_open = failures_to_open
        self._failures = 0  # consecutive
        self._down_until = 0.0
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="materializations")
        self._calls = {(op, o): CALLS.labels(op, o) for op in OPS for o in OUTCOMES}
        self._latency = {op: LATENCY.labels(op) for op in OPS}

    async def resolve(self, resolver: Resolver, names: list[str], ctx: dict, client_secret: str,
                      time_remaining: float | None = None) -> Resolution:
        """Resolve `names`; store calls (if any) end within the store timeout and `time_remaining`."""
        names, ctx = normalize_request(names, ctx)
        steps = resolve_steps(resolver, names, ctx, client_secret, self.cache)
        deadline = None if time_remaining is None else time.monotonic() + time_remaining - DEADLINE_MARGIN
        try:
            call = next(steps)
            while True:
                call = steps.send(await self._call(call, deadline))
        except StopIteration as done:
            return done.value

    async def _call(self, call: StoreCall, deadline: float | None) -> Any:
        op = "read" if isinstance(call, ReadKeys) else "write"
        now = time.monotonic()
        if now < self._down_until:
            self._calls[op, "skipped"].inc()
            return None
        budget = self.timeout if deadline is None else min(self.timeout, deadline - now)
        if budget <= 0:
            self._calls[op, "skipped"].inc()
            return None
        loop = asyncio.get_running_loop()
        if op == "read":
            future = loop.run_in_executor(self._executor, self.store.read, call.keys)  # type: ignore[union-attr]
        else:
            future = loop.run_in_executor(self._executor, self.store.write, call.records)  # type: ignore[union-attr]
        t0 = time.perf_counter()
        try:
            answer = await asyncio.wait_for(future, budget)
        except TimeoutError:
            self._failed(op, "timeout", f"no answer within {budget:.3f}s", t0)
            return None
        except Exception as exc:  # any store failure: serve without the store, never fail the resolve
            self._failed(op, "error", repr(exc), t0)
            return None
        self._latency[op].observe(time.perf_counter() - t0)
        self._calls[op, "ok"].inc()
        self._failures = 0
        return answer

    def _failed(self, op: str, outcome: str, error: str, t0: float) -> None:
        self._latency[op].observe(time.perf_counter() - t0)
        self._calls[op, outcome].inc()
        self._failures += 1
        if self._failures < self.failures_to_open:
            return  # a lone slow call (a GC pause, a busy machine) does not make the store "down"
        if time.monotonic() >= self._down_until:  # log once per interval, not per request
            log.warning("materialization store failing; serving without it",
                        extra={"fields": {"store": self.store.describe(), "op": op, "outcome": outcome,
                                          "error": error, "retry_after_s": self.retry_after}})
        self._down_until = time.monotonic() + self.retry_after

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.store.close()

