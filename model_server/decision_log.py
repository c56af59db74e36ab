"""Every Decide lands in the lake's `decisions` table (contract 3), off the request's hot path.

A decision is queued in memory and the queue is handed to the shared `LakeWriter`
(`append_nowait`) at most every `interval` seconds (20 ms by default) or as soon as `max_batch`
decisions wait, so many decisions share one encoding, one write-ahead append, one fsync and one
wake-up of the writer thread, and the call returns without waiting for the disk. Each hand-over
costs a fixed ~0.2 ms of the writer thread on cold caches (pyarrow calls, fdatasync) and a GIL
hand-off with the event loop, so the interval sets the log's CPU: measured with
`bench.model_server`, 20 ms rather than 5 ms cut Decide's server CPU per call from ~640-660 to
~550-570 µs at concurrency 1 and from ~470 to ~380 µs at 32 (p50 1.50x -> 1.38x the echo at 1).

**The window, and why it needs back-pressure.** A decision answered but not yet fsynced is lost if
the process is SIGKILLed (a SIGTERM drains it). Without a bound, how far the writer falls behind is
up to the machine: under load (a slow fsync, the writer thread starved of the GIL or the CPU) hand-
overs pile up in its queue, and a fault-injection run lost decisions answered 250 ms before a kill
while the docs promised ~20 ms. So before a Decide runs its policy, `admit` looks at the oldest
hand-over the writer has not fsynced yet: if it is older than `max_lag` (or more than
`max_backlog` records are unsynced), the call waits for the writer to catch up, and fails
UNAVAILABLE (nothing decided, nothing logged, safe to retry) if its deadline or `max_wait` comes
first. A decision is thus only answered while the writer is at most `max_lag` behind, which bounds
the window at about `interval + max_lag` plus the commit in progress (documented as 100 ms with the
defaults, 20 + 40 ms; one fsync that itself stalls longer stretches it by its own length, which only
`durable=True` avoids). The backlog (records answered, not yet fsynced) is the gauge
`twofold_model_decision_log_backlog`; waits and refusals are counted.

`durable=True` (`--durable-decisions`) closes the window entirely by answering only after the
record is fsynced, at the cost of the fsync latency on every call.

Retries of one decision id replay the same arm, so duplicates are identical rows that readers
drop by `decision_id` (contract 3).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import Counter, Gauge

log = logging.getLogger("twofold.model.decisions")

BACKLOG = Gauge("twofold_model_decision_log_backlog",
                "Decisions answered whose records are not fsynced yet (lost on a SIGKILL).",
                multiprocess_mode="livesum")
WAITS = Counter("twofold_model_decision_log_waits",
                "Decide calls that waited for the decision log to catch up (back-pressure).")
REFUSED = Counter("twofold_model_decision_log_refusals",
                  "Decide calls refused UNAVAILABLE because the decision log stayed behind.")

DEFAULT_MAX_LAG_S = 0.040
DEFAULT_MAX_BACKLOG = 50_000
DEFAULT_MAX_WAIT_S = 2.0


class Writer(Protocol):
    """The part of `twofold.lake.LakeWriter` the decision log uses."""

    async def append(self, records: list[dict[str, Any]]) -> None: ...
    def append_nowait(self, records: list[dict[str, Any]]) -> concurrent.futures.Future[None]: ...
    async def flush(self) -> None: ...
    async def close(self) -> None: ...


class LogBehindError(Exception):
    """The writer stayed more than `max_lag` behind for as long as the call could wait."""


@dataclass
class _HandOver:
    at: float
    count: int
    future: concurrent.futures.Future[None]


class DecisionLog:
    """Batches decision records into the lake writer (see the module docstring)."""

    def __init__(self, writer: Writer, durable: bool = False, interval: float = 0.020,
                 max_batch: int = 512, *, max_lag: float = DEFAULT_MAX_LAG_S,
                 max_backlog: int = DEFAULT_MAX_BACKLOG, max_wait: float = DEFAULT_MAX_WAIT_S) -> None:
        self.writer = writer
        self.durable = durable
        self.interval = interval
        self.max_batch = max_batch
        self.max_lag = max_lag
        self.max_backlog = max_backlog
        self.max_wait = max_wait
        self._timer: asyncio.TimerHandle | None = None
        self._batch: list[dict[str, Any]] = []
        # Hand-overs not known to be fsynced yet, oldest first (the writer commits them in order).
        self._handed: collections.deque[_HandOver] = collections.deque()
        self._handed_records = 0  # written by the event loop only
        self._synced_records = 0  # written by the writer's thread only (done callbacks)
        self.failed = 0

    @staticmethod
    def record(decision_id: str, unit: str, model: str, version: str, arm: str, propensity: float,
               features: list[float]) -> dict[str, Any]:
        return {"decision_id": decision_id, "ts": time.time_ns() // 1000, "unit": unit, "model": model,
                "model_version": version, "arm": arm, "propensity": propensity, "features": features}

    @property
    def backlog(self) -> int:
        """Records answered but not yet fsynced (queued here or handed to the writer)."""
        return len(self._batch) + self._handed_records - self._synced_records

    def _behind(self) -> _HandOver | None:
        """The oldest unsynced hand-over if the writer is too far behind to answer another decision."""
        handed = self._handed
        while handed and handed[0].future.done():
            handed.popleft()
        if not handed:
            return None
        oldest = handed[0]
        if time.monotonic() - oldest.at > self.max_lag or self.backlog >= self.max_backlog:
            return oldest
        return None

    async def admit(self, time_remaining: float | None = None) -> None:
        """Wait while the writer is too far behind (back-pressure); LogBehindError if it stays behind.

        Called before a decision is made, so a refused call has decided and logged nothing.
        """
        if self.durable:
            return
        oldest = self._behind()
        if oldest is None:
            return
        WAITS.inc()
        budget = self.max_wait if time_remaining is None else min(self.max_wait, time_remaining)
        give_up = time.monotonic() + budget
        while oldest is not None:
            left = give_up - time.monotonic()
            if left <= 0:
                REFUSED.inc()
                raise LogBehindError(f"the decision log is {time.monotonic() - oldest.at:.3f} s behind "
                                f"({self.backlog} records not yet durable); retry shortly")
            await asyncio.wait([asyncio.wrap_future(oldest.future)], timeout=left)
            oldest = self._behind()

    async def log(self, record: dict[str, Any]) -> None:
        """Queue (or, when durable, write and fsync) one decision."""
        if self.durable:
            await self.writer.append([record])
            return
        self._batch.append(record)
        if len(self._batch) >= self.max_batch:
            self._hand_over()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._hand_over)

    def _hand_over(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._batch = self._batch, []
        if not batch:
            return
        try:
            future = self.writer.append_nowait(batch)
        except Exception:
            self._lost(len(batch))
            return
        self._handed.append(_HandOver(time.monotonic(), len(batch), future))
        self._handed_records += len(batch)
        BACKLOG.set(self.backlog)  # set per hand-over (and per fsync), not per call: a few µs each
        count = len(batch)
        future.add_done_callback(lambda f: self._done(f, count))

    def _done(self, future: concurrent.futures.Future[None], count: int) -> None:
        """In the writer's thread: the hand-over is durable (or failed and will never be)."""
        self._synced_records += count
        BACKLOG.set(self.backlog)
        if future.cancelled() or future.exception() is not None:
            self._lost(count, future.exception() if not future.cancelled() else None)

    def _lost(self, count: int, error: BaseException | None = None) -> None:
        self.failed += 1
        log.error("decision records could not be written to the lake", extra={"fields": {
            "records": count, "error": repr(error)}})

    async def drain(self) -> None:
        """Wait until every queued decision is durable in the write-ahead log."""
        self._hand_over()
        pending = [h.future for h in self._handed]
        if pending:
            await asyncio.gather(*(asyncio.wrap_future(f) for f in pending), return_exceptions=True)
        self._behind()  # drop the completed hand-overs

    async def close(self) -> None:
        """Drain, compact into Parquet and stop the writer (on shutdown, after in-flight calls)."""
        await self.drain()
        await self.writer.close()
