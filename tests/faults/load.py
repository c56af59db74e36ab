"""A load generator in its own process: closed-loop calls at a fixed concurrency, plus health probes.

Run as `python -m tests.faults.load --target HOST:PORT --method /pkg.Service/Method --request HEX ...`;
it prints one JSON document: per status code the count and latency percentiles, and the health
probes sent and failed. Probes open a fresh channel each time with a 1 s deadline, as the kubelet's
gRPC probe does, so a probe fails exactly when a Kubernetes probe would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import defaultdict
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return {"p50_ms": at(0.5), "p90_ms": at(0.9), "p99_ms": at(0.99), "max_ms": round(ordered[-1] * 1000, 2)}


async def _caller(call: grpc.aio.UnaryUnaryMultiCallable, request: bytes, until: float, deadline: float,
                  metadata: tuple, results: dict[str, list[float]], stop_on: frozenset[str]) -> None:
    code = ""
    while time.perf_counter() < until and code not in stop_on:
        t0 = time.perf_counter()
        try:
            await call(request, timeout=deadline, metadata=metadata)
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        results[code].append(time.perf_counter() - t0)


async def _prober(target: str, until: float, every: float, probes: dict[str, int | list[float]]) -> None:
    while time.perf_counter() < until:
        t0 = time.perf_counter()
        async with grpc.aio.insecure_channel(target) as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                ok = reply.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.aio.AioRpcError:
                ok = False
        elapsed = time.perf_counter() - t0
        probes["sent"] += 1  # type: ignore[operator]
        probes["failed"] += 0 if ok else 1  # type: ignore[operator]
        probes["latencies"].append(elapsed)  # type: ignore[union-attr]
        await asyncio.sleep(max(0.0, every - elapsed))


async def run(args: argparse.Namespace, request: bytes) -> dict:
    metadata = tuple(tuple(m.split("=", 1)) for m in args.metadata)
    results: dict[str, list[float]] = defaultdict(list)
    probes: dict[str, int | list[float]] = {"sent": 0, "failed": 0, "latencies": []}
    channels = [grpc.aio.insecure_channel(args.target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(args.channels)]
    for channel in channels:
        await channel.channel_ready()
    calls = [c.unary_unary(args.method, request_serializer=None, response_deserializer=None) for c in channels]
    until = time.perf_counter() + args.seconds
    stop_on = frozenset(args.stop_on)
    tasks = [asyncio.create_task(_caller(calls[i % len(calls)], request, until, args.timeout, metadata, results,
                                         stop_on))
             for i in range(args.concurrency)]
    if args.probe_every > 0:
        tasks.append(asyncio.create_task(_prober(args.target, until, args.probe_every, probes)))
    await asyncio.gather(*tasks)
    for channel in channels:
        await channel.close()
    latencies = probes.pop("latencies")
    return {"codes": {code: {"count": len(v), **_percentiles(v)} for code, v in sorted(results.items())},
            "probes": {**probes, **_percentiles(latencies)}}  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--request", default="", help="the serialized request, hex")
    parser.add_argument("--request-file", default=None, help="the serialized request, in a file")
    parser.add_argument("--metadata", nargs="*", default=[], help="key=value pairs sent with each call")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--stop-on", nargs="*", default=[],
                        help="status codes after which a caller stops (as a client failing over would)")
    parser.add_argument("--probe-every", type=float, default=0.1)
    args = parser.parse_args()
    try:
        import uvloop
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        request = bytes.fromhex(args.request) if args.request_file is None else Path(args.request_file).read_bytes()
        print(json.dumps(runner.run(run(args, request))))


if __name__ == "__main__":
    main()
