"""Shared benchmark machinery: a closed-loop load generator and server subprocess helpers.

Figures are only comparable within one run on one machine, so every benchmark measures its
baseline (usually the bare echo server) with this same generator, in the same run, and prints
ratios. The generator is closed-loop: `concurrency` workers each keep one call in flight.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class LoadResult:
    """Latency percentiles (µs) and throughput (calls/s) of one load run."""

    name: str
    concurrency: int
    calls: int
    p50_us: float
    p99_us: float
    throughput: float

    def ratio_to(self, base: LoadResult) -> tuple[float, float]:
        """(p50 ratio, throughput ratio) against a baseline run at the same concurrency."""
        return self.p50_us / base.p50_us, self.throughput / base.throughput


async def measure(name: str, call: Callable[[], Awaitable[object]], *, concurrency: int, calls: int,
                  warmup: int = 200) -> LoadResult:
    """Run `calls` calls with `concurrency` in flight; the first `warmup` are not counted."""
    for _ in range(warmup):
        await call()
    per_worker = max(1, calls // concurrency)
    latencies = np.empty(per_worker * concurrency, dtype=np.float64)

    async def worker(index: int) -> None:
        base = index * per_worker
        for i in range(per_worker):
            t0 = time.perf_counter()
            await call()
            latencies[base + i] = time.perf_counter() - t0

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    return LoadResult(name, concurrency, len(latencies), float(np.percentile(latencies, 50) * 1e6),
                      float(np.percentile(latencies, 99) * 1e6), len(latencies) / elapsed)


def spawn(args: Sequence[str], *, env: dict[str, str] | None = None,
          timeout: float = 60) -> tuple[subprocess.Popen[bytes], dict]:
    """Start `python -m twofold ARGS --ready-file F`; return the process and its ready info."""
    folder = tempfile.mkdtemp(prefix="twofold-bench-")
    ready = Path(folder) / "ready.json"
    proc = subprocess.Popen([sys.executable, "-m", "twofold", *args, "--ready-file", str(ready)],
                            cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            detail = proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            raise RuntimeError(f"server {args} did not start: {detail}")
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())


def stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """SIGTERM the process we started, SIGKILL it if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def print_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> None:
    """Print an aligned plain-text table (README-friendly when pasted in a code block)."""
    cells = [[str(c) for c in header]] + [[f"{c:.1f}" if isinstance(c, float) else str(c) for c in row]
                                          for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if n == 0:
            print("  ".join("-" * w for w in widths))
