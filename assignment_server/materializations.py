"""The assignment server's side of sticky assignments: store calls off the event loop, bounded in time.

The resolver core yields the store calls a resolve needs (`twofold.resolver.sticky`); this
module makes them: in a small thread pool (stores are blocking clients), each within the store
timeout and the call's own gRPC deadline, with a per-pod cache of stored entries in front. A
resolve answered from the cache never leaves the event loop; one that needs the store moves to a
worker thread once for all its calls. Blocking clients with socket timeouts, rather than an
asyncio client cancelled on timeout, keep a timed-out command from ever leaving a connection
with a reply that a later command could read as its own.

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
from collections.abc import Generator
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
        """Resolve `names`; store calls (if any) end within the store timeout and `time_remaining`.

        The first pass runs here, answered from the cache; a resolve that needs the store hands
        its remaining passes and calls to one worker thread (one hop, however many calls).
        """
        names, ctx = normalize_request(names, ctx)
        if not resolver.needs_store(names):
            return resolver.resolve_pass(names, ctx, client_secret, None)
        steps = resolve_steps(resolver, names, ctx, client_secret, self.cache)
        try:
            first = next(steps)
        except StopIteration as done:  # nothing to read or write: no store call at all
            return done.value
        now = time.monotonic()
        deadline = now + self.timeout * 2 + DEADLINE_MARGIN  # a read, then a write
        if time_remaining is not None:
            deadline = min(deadline, now + time_remaining - DEADLINE_MARGIN)
        if now >= self._down_until and deadline > now:
            future = asyncio.get_running_loop().run_in_executor(self._executor, self._drive, steps, first, deadline)
            try:
                async with asyncio.timeout(deadline - now):
                    resolution, outcomes = await future
            except TimeoutError:  # the worker is stuck past the socket timeouts: stop waiting for it
                self._record([(_op(first), "timeout", time.monotonic() - now, "no answer in time")])
            else:
                self._record(outcomes)
                return resolution
        else:
            self._record([(_op(first), "skipped", 0.0, "")])
        return _without_store(resolve_steps(resolver, names, ctx, client_secret, self.cache))

    def _drive(self, steps: Generator[StoreCall, Any, Resolution], call: StoreCall,
               deadline: float) -> tuple[Resolution, list[tuple[str, str, float, str]]]:
        """In a worker thread: make the calls `steps` asks for until it returns its resolution.

        After a failed call the rest are skipped (answered None). Returns the outcomes for the
        loop to count: metrics are updated on the loop thread only.
        """
        outcomes: list[tuple[str, str, float, str]] = []
        failed = False
        try:
            while True:
                op = _op(call)
                answer = None
                if failed or time.monotonic() >= deadline:
                    outcomes.append((op, "skipped", 0.0, ""))
                else:
                    t0 = time.perf_counter()
                    try:
                        if isinstance(call, ReadKeys):
                            answer = self.store.read(call.keys)
                        else:
                            answer = self.store.write(call.records)
                        outcomes.append((op, "ok", time.perf_counter() - t0, ""))
                    except TimeoutError as exc:
                        failed = True
                        outcomes.append((op, "timeout", time.perf_counter() - t0, repr(exc)))
                    except Exception as exc:  # any store failure: serve without it, never fail the resolve
                        failed = True
                        outcomes.append((op, "error", time.perf_counter() - t0, repr(exc)))
                call = steps.send(answer)
        except StopIteration as done:
            return done.value, outcomes

    def _record(self, outcomes: list[tuple[str, str, float, str]]) -> None:
        """Count the calls and move the breaker (loop thread)."""
        for op, outcome, seconds, error in outcomes:
            self._calls[op, outcome].inc()
            if outcome == "skipped":
                continue
            self._latency[op].observe(seconds)
            if outcome == "ok":
                self._failures = 0
                continue
            self._failures += 1
            if self._failures < self.failures_to_open:
                continue  # a lone slow call (a GC pause, a busy machine) does not make the store "down"
            if time.monotonic() >= self._down_until:  # log once per interval, not per request
                log.warning("materialization store failing; serving without it",
                            extra={"fields": {"store": self.store.describe(), "op": op, "outcome": outcome,
                                              "error": error, "retry_after_s": self.retry_after}})
            self._down_until = time.monotonic() + self.retry_after

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.store.close()


def _op(call: StoreCall) -> str:
    return "read" if isinstance(call, ReadKeys) else "write"


def _without_store(steps: Generator[StoreCall, Any, Resolution]) -> Resolution:
    """Finish a resolve with every store call answered "failed": the documented degraded mode."""
    try:
        next(steps)
        while True:
            steps.send(None)
    except StopIteration as done:
        return done.value
