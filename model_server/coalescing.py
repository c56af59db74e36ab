"""Coalescing one-row model runs while calls queue (dynamic batching).

Why: in the server, an ONNX Runtime run costs far more than its kernel. A one-row run of the
benchmark's 100-tree model takes ~5 µs in a hot loop but 30-55 µs of thread CPU between gRPC
calls, whose machinery evicts the CPU caches, and the run in turn evicts what the gRPC stack
needs. Measured on the 2-core VM (2026-11-26) with the handler patched to return a prebuilt
response: one run per call still made Predict 1.17x the bare echo's p50 at concurrency 1 and
1.43x at 32 (0.72x its throughput), where the real handler measured 1.19x and 1.36x. At
concurrency 32 those runs are what joining saves: with this module, `bench.model_server` measured
single-row Predict at 0.82x the echo's p50 and 1.13x its throughput there, Decide 1.33x / 0.79x
(from 1.84x / 0.57x), with concurrency 1 unchanged.

How: a one-row Predict or Decide that finds a batch open for its model version joins it; the
batch runs once, after `window_seconds` or as soon as it holds `max_rows` rows, and every caller
gets its own row. When no batch is open, the call runs inline, exactly as without this module,
unless batching is on; then it opens a batch.

When: waiting for company pays only when calls queue; a lone caller would just wait. Batching
is off at first. While it is off, one call in a while is a probe: it opens a batch, and if that
window collects `start_rows` rows, calls are arriving faster than the window and batching goes
on. A probe that collects fewer leaves it off and doubles the time to the next probe (from
`probe_min_seconds` up to `probe_max_seconds`), so a sequential caller holds one call per
`probe_max_seconds` for at most one window and runs every other call inline. Batching goes off
again after MISSES_TO_STOP windows in a row ended with a single row.

Exactness: every batch has fewer than `runtime.BATCH_ROWS` rows, so it runs on the version's
one-thread session, where a row's outputs do not depend on the rows beside it (tested bit for
bit for XGBoost models and every policy kind): a coalesced Predict or Decide answers exactly
what it would alone, and a logged decision still replays from its id.

Everything here runs on the event loop's thread; there are no locks.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model_server.runtime import BATCH_ROWS, LoadedModel

DEFAULT_WINDOW_SECONDS = 0.001
DEFAULT_MAX_ROWS = 32
# While batching is off, a probe (one call held for a window) every PROBE_MIN_SECONDS, doubling
# after each probe that found too little company, up to PROBE_MAX_SECONDS.
PROBE_MIN_SECONDS = 0.02
PROBE_MAX_SECONDS = 0.25
# Rows a probe's window must collect to start batching: calls arriving this densely queue.
START_ROWS = 4
# Windows in a row with fewer than two rows before batching stops: one alone can be chance, as the
# event loop's timer may end a window early when its clock was read long ago.
MISSES_TO_STOP = 3

DecideResult = tuple[np.ndarray, int, float]


@dataclass
class _Batch:
    """The rows waiting for one run of one model version, and who waits for them."""

    model: LoadedModel
    method: str
    probe: bool
    rows: list[np.ndarray] = field(default_factory=list)
    decision_ids: list[str] = field(default_factory=list)
    waiters: list[asyncio.Future[Any]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class RunCoalescer:
    """Joins concurrent one-row Predict and Decide runs of a model version into one run."""

    def __init__(self, window_seconds: float = DEFAULT_WINDOW_SECONDS, max_rows: int = DEFAULT_MAX_ROWS, *,
                 start_rows: int = START_ROWS, probe_min_seconds: float = PROBE_MIN_SECONDS,
                 probe_max_seconds: float = PROBE_MAX_SECONDS) -> None:
        if window_seconds < 0:
            raise ValueError("the coalescing window must be 0 (off) or positive")
        if not 2 <= max_rows < BATCH_ROWS:
            raise ValueError(f"coalesced runs must hold 2 to {BATCH_ROWS - 1} rows (the one-thread session)")
        self.window_seconds = window_seconds
        self.max_rows = max_rows
        self.start_rows = min(start_rows, max_rows)
        self.probe_min_seconds = probe_min_seconds
        self.probe_max_seconds = probe_max_seconds
        self.batching = False
        self._open: dict[tuple[int, str], _Batch] = {}
        self._misses = 0
        self._probe_interval = probe_min_seconds
        self._next_probe = 0.0

    def predict(self, model: LoadedModel, x: np.ndarray) -> asyncio.Future[np.ndarray] | None:
        """A future of this row's `(1, cols)` outputs, or None: run `model.predict(x)` inline."""
        return self._admit(model, "Predict", x, "")

    def decide(self, model: LoadedModel, x: np.ndarray, decision_id: str) -> asyncio.Future[DecideResult] | None:
        """A future of `(scores, arm, propensity)` for this row, or None: run `model.decide` inline."""
        return self._admit(model, "Decide", x, decision_id)

    # -- internals ------------------------------------------------------------------------------

    def _admit(self, model: LoadedModel, method: str, x: np.ndarray, decision_id: str) -> asyncio.Future[Any] | None:
        key = (id(model), method)
        batch = self._open.get(key)
        if batch is None:
            if not self.window_seconds:
                return None
            if not self.batching:
                now = time.monotonic()
                if now < self._next_probe:
                    return None
                self._next_probe = float("inf")  # until this probe's window closes
            loop = asyncio.get_running_loop()
            batch = self._open[key] = _Batch(model, method, probe=not self.batching)
            batch.timer = loop.call_later(self.window_seconds, self._close, key)
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        batch.rows.append(x)
        batch.decision_ids.append(decision_id)
        batch.waiters.append(waiter)
        if len(batch.rows) >= self.max_rows:
            if batch.timer is not None:
                batch.timer.cancel()
            self._judge(self._open.pop(key))
        return waiter

    def _close(self, key: tuple[int, str]) -> None:
        """A batch's window ended: run what it collected."""
        self._judge(self._open.pop(key))

    def _judge(self, batch: _Batch) -> None:
        """Start, keep or stop batching by what this batch collected, then run it."""
        n = len(batch.rows)
        if batch.probe and not self.batching:
            if n >= self.start_rows:
                self.batching, self._misses, self._probe_interval = True, 0, self.probe_min_seconds
            else:
                self._probe_interval = min(2 * self._probe_interval, self.probe_max_seconds)
                self._next_probe = time.monotonic() + self._probe_interval
        elif n >= 2:
            self._misses = 0
        else:
            self._misses += 1
            if self._misses >= MISSES_TO_STOP:
                self.batching = False
                self._next_probe = time.monotonic() + self._probe_interval
        self._run(batch)

    def _run(self, batch: _Batch) -> None:
        """One run for every row; each waiter gets its row (or the run's error)."""
        n = len(batch.rows)
        batch.model.metrics.run_rows[batch.method].observe(n)
        x = batch.rows[0] if n == 1 else np.concatenate(batch.rows)
        results: list[Any]
        try:
            if batch.method == "Predict":
                out = batch.model.predict(x)
                results = [out[i:i + 1] for i in range(n)]
            else:
                scores, arms, propensities = batch.model.decide_rows(x, batch.decision_ids)
                results = [(scores[i], int(arms[i]), float(propensities[i])) for i in range(n)]
        except Exception as exc:  # every waiter's handler reports it (INTERNAL) and the server goes on
            for waiter in batch.waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        for waiter, result in zip(batch.waiters, results, strict=True):
            if not waiter.done():  # a cancelled call (client gone) no longer waits
                waiter.set_result(result)
