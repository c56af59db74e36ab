"""What the shared server runtime costs: echo behind `twofold.server` vs a bare `grpc.aio` echo.

Both servers run as separate processes (`twofold serve-echo` with and without `--bare`), so the
client's CPU is not the server's. The runtime adds health, reflection, per-method Prometheus
metrics and the concurrency limiter; the ratio shows what that costs per call.

    python -m bench.runtime [--calls 20000]
"""

from __future__ import annotations

import argparse
import asyncio

import grpc

from bench.common import LoadResult, measure, print_table, spawn, stop
from protos.twofold.echo.v1 import echo_pb2, echo_pb2_grpc


async def _run(target: str, name: str, concurrency: int, calls: int) -> LoadResult:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        request = echo_pb2.EchoRequest(payload=b"x" * 64)
        return await measure(name, lambda: stub.Echo(request), concurrency=concurrency, calls=calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args()
    bare, bare_info = spawn(["serve-echo", "--bare", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1"])
    full, full_info = spawn(["serve-echo", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"])
    try:
        rows = []
        for concurrency in (1, 32):
            base = asyncio.run(_run(f"127.0.0.1:{bare_info['port']}", "bare echo", concurrency, args.calls))
            ours = asyncio.run(_run(f"127.0.0.1:{full_info['port']}", "runtime echo", concurrency, args.calls))
            p50_ratio, tput_ratio = ours.ratio_to(base)
            for result in (base, ours):
                rows.append((result.name, concurrency, result.p50_us, result.p99_us, result.throughput,
                             f"{p50_ratio:.2f}x" if result is ours else "1.00x",
                             f"{tput_ratio:.2f}x" if result is ours else "1.00x"))
        print_table(rows, ("server", "conc", "p50 µs", "p99 µs", "calls/s", "p50 vs bare", "tput vs bare"))
    finally:
        stop(full)
        stop(bare)


if __name__ == "__main__":
    main()
