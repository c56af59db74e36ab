"""A dependency-free progress bar for the demo's long steps.

Draws in place on a terminal (carriage return) and prints a single summary line otherwise
(CI logs, pipes), so logs stay readable. Thread-safe: simulation workers advance it.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class Progress:
    """`with Progress("simulate", total=9000) as bar: bar.advance()`."""

    def __init__(self, label: str, total: int, *, stream: TextIO | None = None, width: int = 30,
                 min_interval: float = 0.1, enabled: bool = True) -> None:
        self.label = label
        self.total = max(1, total)
        self.done = 0
        self.stream = stream or sys.stderr
        self.width = width
        self.min_interval = min_interval
        # Drawn in place only on a terminal; `enabled=False` keeps just the summary line.
        self.tty = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._last_draw = 0.0

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done = min(self.total, self.done + n)
            now = time.monotonic()
            if self.tty and (now - self._last_draw >= self.min_interval or self.done == self.total):
                self._last_draw = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        share = self.done / self.total
        filled = int(self.width * share)
        elapsed = now - self._started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r  {self.label:<22} [{bar}] {self.done}/{self.total} "
                          f"{share:6.1%}  {rate:7.0f}/s  eta {eta:4.0f}s ")
        self.stream.flush()

    def __enter__(self) -> Progress:
        if self.tty:
            self._draw(time.monotonic())
        return self

    def __exit__(self, *exc: object) -> None:
        elapsed = time.monotonic() - self._started
        if self.tty:
            self._draw(time.monotonic())
            self.stream.write("\n")
        else:
            self.stream.write(f"  {self.label}: {self.done}/{self.total} in {elapsed:.1f}s\n")
        self.stream.flush()
