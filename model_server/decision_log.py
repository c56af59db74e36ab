"""Every Decide lands in the lake's `decisions` table (contract 3), off the request's hot path.

A decision is queued in memory and the queue is handed to the shared `LakeWriter`
(`append_nowait`) at most every `interval` seconds (20 ms by default) or as soon as `max_batch`
decisions wait, so many decisions share one encoding, one write-ahead append, one fsync and one
wake-up of the writer thread, and the call returns without waiting for the disk. The gap this
leaves is the batching interval plus one fsync (about 20-21 ms): a decision answered in that
window is lost if the process is SIGKILLed before its fsync (a SIGTERM drains it). Each hand-over
costs a fixed ~0.2 ms of the writer thread on cold caches (pyarrow calls, fdatasync) and a GIL
hand-off with the event loop, so the interval sets the log's CPU: measured with
`bench.model_server`, 20 ms rather than 5 ms cut Decide's server CPU per call from ~640-660 to
~550-570 µs at concurrency 1 and from ~470 to ~380 µs at 32 (p50 1.50x -> 1.38x the echo at 1).
`durable=True` (`--durable-decisions`) closes the gap by answering only after the record is
fsynced, at the cost of the fsync latency on every call.

Retries of one decision id replay the same arm, so duplicates are identical rows that readers
drop by `decision_id` (contract 3).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import Any, Protocol

log = logging.getLogger("twofold.model.decisions")


class Writer(Protocol):
    """The part of `twofold.lake.LakeWriter` the decision log uses."""

    async def append(self, records: list[dict[str, Any]]) -> None: ...
    def append_nowait(self, records: list[dict[str, Any]]) -> concurrent.futures.Future[None]: ...
    async def flush(self) -> None: ...
    async def close(self) -> None: ...


class DecisionLog:
    """Batches decision records into the lake writer (see the module docstring)."""

    def __init__(self, writer: Writer, durable: bool = False, interval: float = 0.020,
                 max_batch: int = 512) -> None:
        self.writer = writer
        self.durable = durable
        self.interval = interval
        self.max_batch = max_batch
        self._timer: asyncio.TimerHandle | None = None
        self._batch: list[dict[str, Any]] = []
        self._pending: set[concurrent.futures.Future[None]] = set()
        self.failed = 0

    @staticmethod
    def record(decision_id: str, unit: str, model: str, version: str, arm: str, propensity: float,
               features: list[float]) -> dict[str, Any]:
        return {"decision_id": decision_id, "ts": time.time_ns() // 1000, "unit": unit, "model": model,
                "model_version": version, "arm": arm, "propensity": propensity, "features": features}

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
        self._pending.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: concurrent.futures.Future[None]) -> None:
        self._pending.discard(future)
        if future.cancelled() or future.exception() is not None:
            self._lost(-1, future.exception() if not future.cancelled() else None)

    def _lost(self, count: int, error: BaseException | None = None) -> None:
        self.failed += 1
        log.error("decision records could not be written to the lake", extra={"fields": {
            "records": count, "error": repr(error)}})

    async def drain(self) -> None:
        """Wait until every queued decision is durable in the write-ahead log."""
        self._hand_over()
        pending = list(self._pending)
        if pending:
            await asyncio.gather(*(asyncio.wrap_future(f) for f in pending), return_exceptions=True)

    async def close(self) -> None:
        """Drain, compact into Parquet and stop the writer (on shutdown, after in-flight calls)."""
        await self.drain()
        await self.writer.close()
