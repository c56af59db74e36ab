"""Model server latency and throughput against a bare `grpc.aio` echo server, in the same run.

Both servers run as their own processes (`twofold serve-echo --bare` and `twofold serve-model`),
so the client's CPU is not the server's. The model server runs exactly as deployed (health,
reflection, gRPC and model metrics, decision log to a lake). Models: an XGBoost classifier with
100 trees of depth 6 over 20 features, exported to ONNX, and a LinUCB policy over 20 features
and 5 arms. Printed:

- single-row Predict and Decide at concurrency 1 and 32: p50, p99, calls/s and ratios to echo
  (goals: p50 <= 1.15x echo, throughput >= 0.85x echo);
- server CPU time per call (user + system, from /proc, all workers), a figure that a busy shared
  machine distorts far less than wall-clock latency;
- how many one-row calls the server coalesced into shared runs (it does so only while calls
  queue; `--coalesce-window-ms 0` turns it off for comparison);
- Score of 100 candidates: server-side time per call (the server's own handling-time metric,
  mean from its histogram; goal <= 300 µs) and candidate rows scored per second.

    python -m bench.model_server [--calls 20000] [--rounds 10] [--workers 1] [--coalesce-window-ms MS]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np

from bench.common import LoadResult, measure, print_table, spawn, stop
from protos.twofold.echo.v1 import echo_pb2, echo_pb2_grpc
from protos.twofold.model.v1 import model_pb2, model_pb2_grpc

WIDTH = 20
ARMS = ["a", "b", "c", "d", "e"]


def build_repository(root: Path) -> None:
    """Train and publish the benchmark models (needs the `train` extra)."""
    from model_server.bandits import PolicyConfig, fit_linear_arms, publish_policy
    from model_server.training import train_xgboost

    rng = np.random.default_rng(0)
    x = rng.normal(size=(5000, WIDTH)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] * x[:, 2] - np.abs(x[:, 3]) + rng.logistic(size=5000) * 0.5 > 0).astype(int)
    train_xgboost(x, y, name="ranker", repository=root, params={"n_estimators": 100, "max_depth": 6})
    arms = rng.integers(0, len(ARMS), 5000)
    rewards = rng.binomial(1, 0.3 + 0.1 * (arms == 2), size=5000).astype(float)
    publish_policy(repository=root, name="bandit", arms=ARMS, feature_names=[f"f{i}" for i in range(WIDTH)],
                   stats=fit_linear_arms(x, arms, rewards, len(ARMS)), config=PolicyConfig(policy="linucb"))


def rows(n: int, seed: int = 1) -> model_pb2.DenseRows:
    x = np.random.default_rng(seed).normal(size=(n, WIDTH)).astype("<f4")
    return model_pb2.DenseRows(data=x.tobytes(), rows=n, cols=WIDTH)


Call = Callable[[], Awaitable[object]]


async def closed_loop(call: Call, concurrency: int, calls: int) -> tuple[np.ndarray, float]:
    """Latencies (s) of `calls` calls with `concurrency` in flight, and the elapsed wall time."""
    per_worker = max(1, calls // concurrency)
    latencies = np.empty(per_worker * concurrency)

    async def worker(index: int) -> None:
        for i in range(per_worker):
            t0 = time.perf_counter()
            await call()
            latencies[index * per_worker + i] = time.perf_counter() - t0

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return latencies, time.perf_counter() - started


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (the workers of `--workers N`)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError):
                queue.extend(int(c) for c in (task / "children").read_text().split())
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a server process and its workers (Linux /proc)."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


CPU_PER_CALL: dict[tuple[str, int], float] = {}


async def interleaved(named_calls: dict[str, Call], concurrency: int, calls: int, rounds: int,
                      pids: dict[str, int] | None = None) -> list[LoadResult]:
    """Measure each call in alternating rounds, so a noisy neighbour hurts every series alike.

    The machine is shared: measuring the baseline and the server back to back in one block each
    lets a burst of someone else's load land on one side only. Rounds spread it over both.
    """
    for call in named_calls.values():
        for _ in range(200):
            await call()
    samples: dict[str, list[np.ndarray]] = {name: [] for name in named_calls}
    elapsed = dict.fromkeys(named_calls, 0.0)
    cpu = dict.fromkeys(named_calls, 0.0)
    for _ in range(rounds):
        for name, call in named_calls.items():
            pid = (pids or {}).get(name)
            before = cpu_seconds(pid) if pid else 0.0
            lat, took = await closed_loop(call, concurrency, calls // rounds)
            cpu[name] += (cpu_seconds(pid) - before) if pid else 0.0
            samples[name].append(lat)
            elapsed[name] += took
    results = []
    for name, parts in samples.items():
        lat = np.concatenate(parts)
        CPU_PER_CALL[(name, concurrency)] = cpu[name] / len(lat)
        results.append(LoadResult(name, concurrency, len(lat), float(np.percentile(lat, 50) * 1e6),
                                  float(np.percentile(lat, 99) * 1e6), len(lat) / elapsed[name]))
    return results


async def run_single_row(echo_target: str, model_target: str, concurrency: int, calls: int,
                         rounds: int, pids: dict[str, int], connections: int) -> list[LoadResult]:
    """Bare echo, one-row Predict and Decide, interleaved.

    Calls rotate over `connections` channels per server: with `--workers N` the kernel spreads
    connections (not calls) over the workers, so one channel would reach one worker only.
    """
    # A distinct channel argument stops gRPC from sharing one subchannel between the channels.
    def channels(target: str) -> list[grpc.aio.Channel]:
        return [grpc.aio.insecure_channel(target, options=[("twofold.bench.connection", i)])
                for i in range(connections)]

    echo_channels, model_channels = channels(echo_target), channels(model_target)
    try:
        echo = [echo_pb2_grpc.EchoServiceStub(c) for c in echo_channels]
        model = [model_pb2_grpc.ModelServiceStub(c) for c in model_channels]
        # The echo payload is as large as a one-row Predict's features (20 float32 as raw bytes).
        echo_request = echo_pb2.EchoRequest(payload=b"x" * (WIDTH * 4 + 16))
        predict = model_pb2.PredictRequest(model="ranker", dense=rows(1))
        context = rows(1)
        counter = iter(range(10**12))

        def echo_call() -> Awaitable[object]:
            return echo[next(counter) % connections].Echo(echo_request)

        def predict_call() -> Awaitable[object]:
            return model[next(counter) % connections].Predict(predict)

        # Built once, like the echo's request: the client's protobuf work is not the server's cost.
        decide_requests = [model_pb2.DecideRequest(model="bandit", unit=f"u{i}", dense=context) for i in range(1000)]

        def decide_call() -> Awaitable[object]:
            n = next(counter)
            return model[n % connections].Decide(decide_requests[n % 1000])
        return await interleaved({"bare echo": echo_call, "Predict 1 row": predict_call, "Decide": decide_call},
                                 concurrency, calls, rounds, pids)
    finally:
        for channel in echo_channels + model_channels:
            await channel.close()


async def run_score(model_target: str, calls: int) -> LoadResult:
    async with grpc.aio.insecure_channel(model_target) as channel:
        stub = model_pb2_grpc.ModelServiceStub(channel)
        request = model_pb2.ScoreRequest(model="ranker", candidates=rows(100))
        return await measure("Score 100", lambda: stub.Score(request), concurrency=1, calls=calls)


def histogram(metrics_port: int, name: str, method: str) -> tuple[list[tuple[float, float]], float, float]:
    """(cumulative buckets, sum, count) of a server histogram for one method."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    buckets: dict[float, float] = {}
    total = count = 0.0
    for line in body.splitlines():
        if not line.startswith(name) or f'method="{method}"' not in line:
            continue
        series, value = line.rsplit(" ", 1)
        if series.startswith(name + "_bucket"):
            le = series.split('le="')[1].split('"')[0]
            bound = float("inf") if le == "+Inf" else float(le)
            buckets[bound] = buckets.get(bound, 0.0) + float(value)
        elif series.startswith(name + "_sum"):
            total += float(value)
        elif series.startswith(name + "_count"):
            count += float(value)
    return sorted(buckets.items()), total, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--score-calls", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds per concurrency")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--connections", type=int, default=0,
                        help="client connections per server (default: 1, or 4 per worker with --workers)")
    parser.add_argument("--coalesce-window-ms", type=float, default=None,
                        help="passed to serve-model (default: the server's; 0 runs every call inline)")
    args = parser.parse_args()
    args.connections = args.connections or (1 if args.workers == 1 else 4 * args.workers)
    folder = Path(tempfile.mkdtemp(prefix="twofold-bench-model-"))
    build_repository(folder / "repo")
    coalescing = [] if args.coalesce_window_ms is None else ["--coalesce-window-ms", str(args.coalesce_window_ms)]
    echo, echo_info = spawn(["serve-echo", "--bare", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1"])
    model, info = spawn(["serve-model", "--repository", str(folder / "repo"), "--lake", str(folder / "lake"),
                         "--workers", str(args.workers), "--host", "127.0.0.1", "--port", "0",
                         "--metrics-port", "0", "--log-level", "warning", *coalescing])
    echo_target, model_target = f"127.0.0.1:{echo_info['port']}", f"127.0.0.1:{info['port']}"
    try:
        table = []
        joined_runs = "twofold_model_coalesced_run_rows"
        coalesced: list[str] = []
        for concurrency in (1, 32):
            pids = {"bare echo": echo.pid, "Predict 1 row": model.pid, "Decide": model.pid}
            before = {m: histogram(info["metrics_port"], joined_runs, m)[1:] for m in ("Predict", "Decide")}
            base, *ours = asyncio.run(run_single_row(echo_target, model_target, concurrency, args.calls,
                                                     args.rounds, pids, args.connections))
            for method, (rows0, runs0) in before.items():
                _, rows1, runs1 = histogram(info["metrics_port"], joined_runs, method)
                mean = (rows1 - rows0) / (runs1 - runs0) if runs1 > runs0 else 0.0
                coalesced.append(f"{method} at concurrency {concurrency}: {rows1 - rows0:,.0f} calls in "
                                 f"{runs1 - runs0:,.0f} joined runs (mean {mean:.1f} rows)")
            base_cpu = CPU_PER_CALL[(base.name, concurrency)]
            table.append((base.name, concurrency, base.p50_us, base.p99_us, base.throughput, "1.00x", "1.00x",
                          base_cpu * 1e6, "1.00x"))
            for result in ours:
                p50_ratio, tput_ratio = result.ratio_to(base)
                cpu = CPU_PER_CALL[(result.name, concurrency)]
                table.append((result.name, concurrency, result.p50_us, result.p99_us, result.throughput,
                              f"{p50_ratio:.2f}x", f"{tput_ratio:.2f}x", cpu * 1e6, f"{cpu / base_cpu:.2f}x"))
        print(f"model server ({args.workers} worker{'s' if args.workers > 1 else ''}) vs bare grpc.aio echo, "
              f"{args.calls} calls per row in {args.rounds} interleaved rounds, {args.connections} connection(s)")
        print_table(table, ("call", "conc", "p50 µs", "p99 µs", "calls/s", "p50 vs echo", "tput vs echo",
                            "server CPU µs/call", "CPU vs echo"))
        print("one-row runs joined by the server's coalescing (model_server.coalescing), warm-up calls included:")
        for line in coalesced:
            print(f"  {line}")

        handling, model_time = "grpc_server_handling_seconds", "twofold_model_latency_seconds"
        _, s0, c0 = histogram(info["metrics_port"], handling, "Score")
        _, ms0, mc0 = histogram(info["metrics_port"], model_time, "Score")
        score = asyncio.run(run_score(model_target, args.score_calls))
        _, s1, c1 = histogram(info["metrics_port"], handling, "Score")
        _, ms1, mc1 = histogram(info["metrics_port"], model_time, "Score")
        server_mean = (s1 - s0) / max(c1 - c0, 1) * 1e6
        onnx_mean = (ms1 - ms0) / max(mc1 - mc0, 1) * 1e6
        print()
        print(f"Score, 100 candidates x {WIDTH} features, concurrency 1, {score.calls} calls")
        print_table([
            ("server-side handling (gRPC method), mean", server_mean),
            ("  of which ONNX Runtime + ranking, mean", onnx_mean),
            ("client round trip, p50", score.p50_us),
            ("client round trip, p99", score.p99_us),
        ], ("Score", "µs"))
        print(f"candidate rows scored per second (one connection): {score.throughput * 100:,.0f}")
        goal = "meets" if server_mean <= 300 else "misses"
        print(f"server-side time {server_mean:.0f} µs per 100 candidates {goal} the 300 µs goal")
    finally:
        stop(model)
        stop(echo)


if __name__ == "__main__":
    main()
