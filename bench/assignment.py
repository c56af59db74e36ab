"""Assignment benchmarks (issue 3, point 8). Prints figures and ratios against baselines of the same run.

(a) In-process resolve of one flag with a targeting rule and an experiment, side by side with the
    `growthbook` SDK evaluating an equivalent feature: median microseconds per evaluation.
(b) ResolveFlags over gRPC against a bare `grpc.aio` echo server started by this script
    (`twofold.echo.start_bare_echo`): p50/p99 latency and throughput at concurrency 1 and 32.
    Each server runs in its own child process; the client is one grpc.aio process. A third
    server, the echo service behind the shared Twofold runtime (metrics, health, limits), shows
    how much of the gap is the runtime every Twofold server pays rather than the resolver.
(c) Durable TrackEvents ingest with batches of 100 (acknowledged = fsynced write-ahead log).

    /work/venv/bin/python bench/assignment.py            # full run
    /work/venv/bin/python bench/assignment.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FLAG_YAML = """
flag: home-ranking
variants:
  static: {system: static, layout: popular}
  model: {system: model, model: home-ranker}
  bandit: {system: bandit, model: home-linucb}
default: static
rules:
  - name: employees
    when: {attribute: email, ends_with: "@twofold.dev"}
    serve: bandit
  - name: ranking-test
    when: {attribute: country, eq: SE}
    experiment: {allocation: 60%, arms: {static: 1, model: 1, bandit: 1}}
"""

GROWTHBOOK_FEATURES = {"home-ranking": {
    "defaultValue": {"system": "static", "layout": "popular"},
    "rules": [
        {"condition": {"email": {"$regex": "@twofold\\.dev$"}}, "force": {"system": "bandit", "model": "home-linucb"}},
        {"condition": {"country": "SE"}, "key": "ranking-test", "hashAttribute": "id", "coverage": 0.6,
         "variations": [{"system": "static", "layout": "popular"}, {"system": "model", "model": "home-ranker"},
                        {"system": "bandit", "model": "home-linucb"}],
         "weights": [1 / 3, 1 / 3, 1 / 3]},
    ]}}


def _flags_dir(root: Path) -> Path:
    folder = root / "flags"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "home-ranking.yaml").write_text(FLAG_YAML)
    return folder


def _median_us(fn, units: list[str], rounds: int) -> float:
    per_round = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for u in units:
            fn(u)
        per_round.append((time.perf_counter() - t0) / len(units) * 1e6)
    return statistics.median(per_round)


def bench_in_process(root: Path, quick: bool) -> None:
    from growthbook import GrowthBook

    from assignment_server.authoring.compiler import DEFAULT_CLIENT_SECRET, compile_folder
    from assignment_server.resolver import Resolver, ResolverState

    resolver = Resolver(ResolverState.from_json(compile_folder(_flags_dir(root)).state_json()))
    units = [f"user-{i}" for i in range(2000)]
    flags = ["flags/home-ranking"]

    def ours(u: str) -> object:
        return resolver.resolve(flags, {"targeting_key": u, "country": "SE", "email": "a@b.com"},
                                DEFAULT_CLIENT_SECRET)[0].value

    gb = GrowthBook(features=GROWTHBOOK_FEATURES)

    def theirs(u: str) -> object:
        gb.set_attributes({"id": u, "country": "SE", "email": "a@b.com"})
        return gb.eval_feature("home-ranking").value

    # Same decisions in kind: both put ~60% of SE users in a 3-arm experiment.
    rounds = 5 if quick else 25
    ours_us = _median_us(ours, units, rounds)
    theirs_us = _median_us(theirs, units, rounds)
    print("(a) in-process evaluation, one flag = targeting rule + 60% 3-arm experiment")
    print(f"    twofold resolver   median {ours_us:7.2f} us/resolve")
    print(f"    growthbook SDK     median {theirs_us:7.2f} us/eval")
    print(f"    ratio twofold/growthbook = {ours_us / theirs_us:.2f}  (goal: twofold <= 5 us)")


# -- servers in child processes -------------------------------------------------------------------

def _serve_echo(queue: mp.Queue) -> None:
    from twofold.echo import start_bare_echo

    async def main() -> None:
        server, port = await start_bare_echo()
        queue.put(port)
        await server.wait_for_termination()
    asyncio.run(main())


def _serve_runtime_echo(queue: mp.Queue) -> None:
    """The echo service behind the shared Twofold runtime (metrics, health, limits): the runtime's own cost."""
    from twofold import echo
    from twofold.server import start_server
    from twofold.settings import ServerSettings

    async def main() -> None:
        running = await start_server(ServerSettings(port=0, metrics_port=None), [echo.registration()])
        queue.put(running.port)
        await running.server.wait_for_termination()
    asyncio.run(main())


def _serve_assignment(queue: mp.Queue, flags: str, lake: str) -> None:
    import argparse as ap
    import logging

    from assignment_server.app import build_setup
    from twofold.server import start_server
    from twofold.settings import ServerSettings

    logging.disable(logging.WARNING)

    async def main() -> None:
        args = ap.Namespace(flags=flags, lake=lake, materializations="memory", token_key=None, token_key_file=None,
                            reload_interval=1.0)
        settings = ServerSettings(port=0, metrics_port=None)
        service = await build_setup(args)(settings)
        running = await start_server(settings, service.services)
        queue.put(running.port)
        await running.server.wait_for_termination()
    asyncio.run(main())


def _start_child(target, *args: object) -> tuple[mp.Process, int]:
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(queue, *args), daemon=True)
    proc.start()
    return proc, queue.get(timeout=60)


async def _load(call, concurrency: int, total: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - t0


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6


async def bench_grpc(echo_port: int, runtime_port: int, assign_port: int, quick: bool) -> None:
    import grpc

    from assignment_server.authoring.compiler import DEFAULT_CLIENT_SECRET
    from protos.twofold.assignment.v1 import assignment_pb2 as pb
    from protos.twofold.assignment.v1 import assignment_pb2_grpc as pb_grpc
    from protos.twofold.echo.v1 import echo_pb2, echo_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{echo_port}") as ec, \
            grpc.aio.insecure_channel(f"127.0.0.1:{runtime_port}") as rc, \
            grpc.aio.insecure_channel(f"127.0.0.1:{assign_port}") as ac:
        echo = echo_pb2_grpc.EchoServiceStub(ec)
        runtime_echo = echo_pb2_grpc.EchoServiceStub(rc)
        assign = pb_grpc.FlagResolverServiceStub(ac)
        request = pb.ResolveFlagsRequest(flags=["flags/home-ranking"], client_secret=DEFAULT_CLIENT_SECRET)
        request.evaluation_context.update({"targeting_key": "user-42", "country": "SE", "email": "a@b.com"})
        echo_req = echo_pb2.EchoRequest(payload=request.SerializeToString())

        async def call_echo() -> None:
            await echo.Echo(echo_req)

        async def call_resolve() -> None:
            await assign.ResolveFlags(request)

        async def call_runtime_echo() -> None:
            await runtime_echo.Echo(echo_req)

        print("(b) ResolveFlags over gRPC vs bare grpc.aio echo (same payload size), loopback")
        for concurrency in (1, 32):
            total = (1000 if quick else 3000) * (1 if concurrency == 1 else 2)
            calls = {"echo": call_echo, "runtime echo": call_runtime_echo, "resolve": call_resolve}
            lat: dict[str, list[float]] = {k: [] for k in calls}
            wall = dict.fromkeys(calls, 0.0)
            for call in calls.values():
                await _load(call, concurrency, 200)
            # Alternate rounds so a noisy neighbour on the machine hits every side alike.
            for _ in range(3):
                for name, call in calls.items():
                    got, seconds = await _load(call, concurrency, total)
                    lat[name] += got
                    wall[name] += seconds
            e50 = _pct(lat["echo"], 0.5)
            for name in calls:
                p50 = _pct(lat[name], 0.5)
                ratio = "" if name == "echo" else f"   p50 {p50 / e50:.2f}x bare echo"
                print(f"    c={concurrency:<3} {name:<13} p50 {p50:7.0f} us  p99 {_pct(lat[name], 0.99):7.0f} us  "
                      f"{len(lat[name]) / wall[name]:7.0f} calls/s{ratio}")

        print("(c) durable TrackEvents ingest, batches of 100 (acknowledged after fsync)")
        batch_no = 0

        async def call_track() -> None:
            nonlocal batch_no
            batch_no += 1
            events = [pb.Event(event_id=f"{batch_no}-{i}", unit=f"user-{i}", name="purchase", value=1.0)
                      for i in range(100)]
            await assign.TrackEvents(pb.TrackEventsRequest(client_secret=DEFAULT_CLIENT_SECRET, events=events))

        for concurrency in (1, 8):
            total = (100 if quick else 500)
            lat, wall = await _load(call_track, concurrency, total)
            print(f"    c={concurrency:<3} {total * 100 / wall:9.0f} events/s  p50 {_pct(lat, 0.5):7.0f} us per batch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bench_in_process(root, args.quick)
        echo_proc, echo_port = _start_child(_serve_echo)
        runtime_proc, runtime_port = _start_child(_serve_runtime_echo)
        assign_proc, assign_port = _start_child(_serve_assignment, str(_flags_dir(root)), str(root / "lake"))
        try:
            asyncio.run(bench_grpc(echo_port, runtime_port, assign_port, args.quick))
        finally:
            for proc in (echo_proc, runtime_proc, assign_proc):
                proc.terminate()
                proc.join(10)


if __name__ == "__main__":
    main()
