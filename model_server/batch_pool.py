"""CPU-heavy model work (calls of `runtime.BATCH_ROWS` rows or more) runs in a small thread pool.

Why: the event loop serves every call on the port. A Score of thousands of candidates or a large
Predict batch holds it for milliseconds to seconds of ONNX Runtime, during which every other call
(health checks included) waits; ONNX Runtime releases the GIL while it runs, so in a thread the
loop keeps answering the small calls. One-row calls stay inline: for them the thread hop would
cost more than the model (see docs/model_server.md, Performance).

Size: one thread per core by default (at most 4), since each run may itself use `--batch-threads`
intra-op threads; more threads than cores only interleave the same CPU. Calls beyond the pool wait
in a queue bounded by `max_queued`; past it a call is refused RESOURCE_EXHAUSTED at once rather
than holding its request's memory (up to the message size limit) in an ever longer queue.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc

from model_server.errors import RequestError, expired

T = TypeVar("T")


def default_threads(workers: int = 1) -> int:
    """One thread per core this worker can count on, between 1 and 4."""
    return max(1, min(4, (os.cpu_count() or 1) // max(1, workers)))


class BatchPool:
    """A bounded thread pool for large model runs, awaited from the event loop."""

    def __init__(self, threads: int | None = None, max_queued: int | None = None) -> None:
        self.threads = threads or default_threads()
        self.max_queued = max_queued if max_queued is not None else 8 * self.threads
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="model-batch")
        self.in_use = 0  # calls running or waiting; changed on the event loop only

    async def run(self, fn: Callable[[], T], time_remaining: float | None = None) -> T:
        """Run `fn` in the pool; RESOURCE_EXHAUSTED when too many large calls already wait.

        A call whose deadline (`time_remaining` seconds from now) passes while it waits is not
        run (DEADLINE_EXCEEDED); one cancelled while it waits is dropped from the queue.
        """
        if self.in_use >= self.threads + self.max_queued:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{self.in_use} large calls are already running or queued on "
                               f"{self.threads} thread(s); retry shortly or send smaller batches", "overloaded")
        self.in_use += 1
        deadline = None if time_remaining is None else time.monotonic() + time_remaining

        def guarded() -> T:
            if deadline is not None and time.monotonic() >= deadline:
                raise expired()
            return fn()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, guarded)
        finally:
            self.in_use -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
