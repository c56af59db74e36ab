"""Assignment benchmarks (issue 3, point 8). Prints figures and ratios against baselines of the same run.

(a) In-process resolve of one flag with a targeting rule and an experiment, side by side with the
    `growthbook` SDK evaluating an equivalent feature: median microseconds per evaluation.
(b) ResolveFlags over gRPC against a bare `grpc.aio` echo server started by this script
    (`twofold.echo.start_bare_echo`): p50/p99 latency and throughput at concurrency 1 and 32.
    Each server is its own `twofold` process (`bench.common.spawn`; the bare one is
    `serve-echo --bare`, i.e. `twofold.echo.start_bare_echo`); the client is this process, with
    bench.common's closed-loop generator. A third server, the echo behind the shared Twofold
    runtime (metrics, health, limits), shows how much of the gap every Twofold server pays.
(c) Durable TrackEvents ingest with batches of 100 (acknowledged = fsynced write-ahead log).
(d) Sticky assignments: ResolveFlags on a sticky experiment rule against the same rule without
    materializations, with the store in a real `redis-server` (started here, loopback, AOF off)
    and in SQLite: units in the pod's cache (no store call), returning units with the cache off
    (one pipelined read), and new units (a read and a first-write-wins write).

    python -m bench.assignment            # full run
    python -m bench.assignment --quick    # smoke run
    python -m bench.assignment --only sticky [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import LoadResult, measure, print_table, spawn, stop
from bench.model_server import cpu_seconds  # /proc user+system time of a server process (and workers)

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

# The same experiment twice, one sticky: (d) compares them on one server.
STICKY_YAML = """
flag: plain-exp
variants: {a: {x: 1}, b: {x: 2}}
rules:
  - name: exp
    experiment: {allocation: 100%, arms: {a: 1, b: 1}}
---
flag: sticky-exp
variants: {a: {x: 1}, b: {x: 2}}
rules:
  - name: exp
    experiment: {allocation: 100%, arms: {a: 1, b: 1}, sticky: true}
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
    (folder / "sticky.yaml").write_text(STICKY_YAML)
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
    from twofold.resolver import Resolver, ResolverState

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


# -- gRPC: every server is its own `twofold` process -------------------------------------------

async def _rounds(calls: dict, pids: dict[str, int], concurrency: int, total: int,
                  rounds: int) -> tuple[dict[str, LoadResult], dict[str, float], dict[str, float]]:
    """Alternate the servers round by round (a noisy neighbour hits all alike).

    Returns each server's median round; the median over rounds of its p50 ratio to the first
    server measured in the same round (paired ratios cancel slow drifts in machine load); and
    the server process's CPU seconds per call (user + system from /proc), which a busy shared
    machine disturbs far less than latency.
    """
    results: dict[str, list[LoadResult]] = {name: [] for name in calls}
    cpu = dict.fromkeys(calls, 0.0)
    for name, call in calls.items():
        await measure(name, call, concurrency=concurrency, calls=200, warmup=200)
    for _ in range(rounds):
        for name, call in calls.items():
            before = cpu_seconds(pids[name])
            results[name].append(await measure(name, call, concurrency=concurrency, calls=total, warmup=0))
            cpu[name] += cpu_seconds(pids[name]) - before
    base = next(iter(calls))
    paired = {name: statistics.median(r.p50_us / b.p50_us for r, b in zip(rs, results[base], strict=True))
              for name, rs in results.items()}
    per_call = {name: cpu[name] / sum(r.calls for r in rs) for name, rs in results.items()}
    return ({name: sorted(rs, key=lambda r: r.p50_us)[len(rs) // 2] for name, rs in results.items()},
            paired, per_call)


async def bench_grpc(ports: dict[str, int], pids: dict[str, int], quick: bool) -> None:
    import grpc

    from assignment_server.authoring.compiler import DEFAULT_CLIENT_SECRET
    from protos.twofold.assignment.v1 import assignment_pb2 as pb
    from protos.twofold.assignment.v1 import assignment_pb2_grpc as pb_grpc
    from protos.twofold.echo.v1 import echo_pb2, echo_pb2_grpc

    channels = {name: grpc.aio.insecure_channel(f"127.0.0.1:{port}") for name, port in ports.items()}
    try:
        echo = echo_pb2_grpc.EchoServiceStub(channels["bare echo"])
        runtime_echo = echo_pb2_grpc.EchoServiceStub(channels["runtime echo"])
        assign = pb_grpc.FlagResolverServiceStub(channels["assignment"])
        request = pb.ResolveFlagsRequest(flags=["flags/home-ranking"], client_secret=DEFAULT_CLIENT_SECRET)
        request.evaluation_context.update({"targeting_key": "user-42", "country": "SE", "email": "a@b.com"})
        echo_req = echo_pb2.EchoRequest(payload=request.SerializeToString())  # same request size
        calls = {"bare echo": lambda: echo.Echo(echo_req), "runtime echo": lambda: runtime_echo.Echo(echo_req),
                 "ResolveFlags": lambda: assign.ResolveFlags(request)}
        server_of = {"bare echo": "bare echo", "runtime echo": "runtime echo", "ResolveFlags": "assignment"}
        print("(b) ResolveFlags over gRPC vs a bare grpc.aio echo, same request size, loopback")
        rows = []
        for concurrency in (1, 32):
            total = (600 if quick else 2000) * (1 if concurrency == 1 else 2)
            got, paired, cpu = await _rounds(calls, {n: pids[server_of[n]] for n in calls}, concurrency, total, 5)
            for name, r in got.items():
                p50_ratio, tput_ratio = r.ratio_to(got["bare echo"])
                rows.append((name, concurrency, r.p50_us, r.p99_us, r.throughput,
                             f"{p50_ratio:.2f}x", f"{paired[name]:.2f}x", f"{tput_ratio:.2f}x",
                             cpu[name] * 1e6, f"{cpu[name] / cpu['bare echo']:.2f}x"))
        print_table(rows, ("server", "conc", "p50 us", "p99 us", "calls/s", "p50 vs bare", "paired p50 ratio",
                           "tput vs bare", "server CPU us/call", "CPU vs bare"))

        print("(c) durable TrackEvents ingest, batches of 100 (acknowledged after the write-ahead fsync)")
        batch_no = 0

        async def track() -> None:
            nonlocal batch_no
            batch_no += 1
            events = [pb.Event(event_id=f"{batch_no}-{i}", unit=f"user-{i}", name="purchase", value=1.0)
                      for i in range(100)]
            await assign.TrackEvents(pb.TrackEventsRequest(client_secret=DEFAULT_CLIENT_SECRET, events=events))

        rows = []
        for concurrency in (1, 8):
            r = await measure("TrackEvents", track, concurrency=concurrency, calls=100 if quick else 600, warmup=20)
            rows.append(("TrackEvents x100", concurrency, r.p50_us, r.p99_us, r.throughput * 100))
        print_table(rows, ("call", "conc", "p50 us", "p99 us", "events/s"))
    finally:
        for channel in channels.values():
            await channel.close()


async def bench_sticky(ports: dict[str, int], pids: dict[str, int], quick: bool) -> None:
    import itertools

    import grpc

    from assignment_server.authoring.compiler import DEFAULT_CLIENT_SECRET
    from protos.twofold.assignment.v1 import assignment_pb2 as pb
    from protos.twofold.assignment.v1 import assignment_pb2_grpc as pb_grpc

    channels = {name: grpc.aio.insecure_channel(f"127.0.0.1:{port}") for name, port in ports.items()}
    stubs = {name: pb_grpc.FlagResolverServiceStub(c) for name, c in channels.items()}

    def request(flag: str, unit: str) -> pb.ResolveFlagsRequest:
        r = pb.ResolveFlagsRequest(flags=[flag], client_secret=DEFAULT_CLIENT_SECRET)
        r.evaluation_context.update({"targeting_key": unit})
        return r

    pool = [f"returning-{i}" for i in range(1000)]
    try:
        for stub in stubs.values():  # every returning unit stored (and cached where there is a cache)
            for unit in pool:
                await stub.ResolveFlags(request("flags/sticky-exp", unit))
        plain = [request("flags/plain-exp", u) for u in pool]
        sticky = [request("flags/sticky-exp", u) for u in pool]
        fresh = itertools.count()

        def cycling(stub: pb_grpc.FlagResolverServiceStub, requests: list) -> object:
            it = itertools.cycle(requests)
            return lambda: stub.ResolveFlags(next(it))

        def new_units(stub: pb_grpc.FlagResolverServiceStub, tag: str) -> object:
            return lambda: stub.ResolveFlags(request("flags/sticky-exp", f"new-{tag}-{next(fresh)}"))

        calls = {
            "no materializations": cycling(stubs["redis"], plain),
            "redis, cached": cycling(stubs["redis"], sticky),
            "redis, read": cycling(stubs["redis nocache"], sticky),
            "redis, read+write": new_units(stubs["redis nocache"], "r"),
            "sqlite, read": cycling(stubs["sqlite nocache"], sticky),
            "sqlite, read+write": new_units(stubs["sqlite nocache"], "s"),
        }
        server_of = {"no materializations": "redis", "redis, cached": "redis", "redis, read": "redis nocache",
                     "redis, read+write": "redis nocache", "sqlite, read": "sqlite nocache",
                     "sqlite, read+write": "sqlite nocache"}
        print("(d) ResolveFlags on a sticky experiment rule vs the same rule without materializations")
        rows = []
        for concurrency in (1, 32):
            total = (300 if quick else 1000) * (1 if concurrency == 1 else 2)
            got, paired, cpu = await _rounds(calls, {n: pids[server_of[n]] for n in calls}, concurrency, total,
                                             3 if quick else 5)
            base = got["no materializations"]
            for name, r in got.items():
                rows.append((name, concurrency, r.p50_us, r.p99_us, r.throughput, f"{r.p50_us / base.p50_us:.2f}x",
                             f"{paired[name]:.2f}x", cpu[name] * 1e6))
        print_table(rows, ("rule / store", "conc", "p50 us", "p99 us", "calls/s", "p50 vs plain",
                           "paired p50 ratio", "server CPU us/call"))
    finally:
        for channel in channels.values():
            await channel.close()


def run_sticky(root: Path, quick: bool, local: list[str]) -> None:
    from tests.redis_server import RedisServer

    redis = RedisServer(root / "redis", persistent=False)
    flags = str(_flags_dir(root))

    def assignment(name: str, store: str, *extra: str) -> tuple:
        return spawn(["serve-assignment", "--flags", flags, "--lake", str(root / name / "lake"),
                      "--materializations", store, "--log-level", "error", *extra, *local])

    servers = {"redis": assignment("redis", redis.url),
               "redis nocache": assignment("redis-nocache", redis.url, "--materializations-cache", "0"),
               "sqlite nocache": assignment("sqlite", str(root / "m.sqlite"), "--materializations-cache", "0")}
    try:
        asyncio.run(bench_sticky({name: info["port"] for name, (_, info) in servers.items()},
                                 {name: proc.pid for name, (proc, _) in servers.items()}, quick))
    finally:
        for proc, _ in servers.values():
            stop(proc)
        redis.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["sticky"], help="run only part (d)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        local = ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1"]
        if args.only == "sticky":
            run_sticky(root, args.quick, local)
            return
        bench_in_process(root, args.quick)
        servers = {
            "bare echo": spawn(["serve-echo", "--bare", *local]),
            "runtime echo": spawn(["serve-echo", *local]),
            "assignment": spawn(["serve-assignment", "--flags", str(_flags_dir(root)), "--lake", str(root / "lake"),
                                 "--materializations", "memory", "--log-level", "error", *local]),
        }
        try:
            asyncio.run(bench_grpc({name: info["port"] for name, (_, info) in servers.items()},
                                   {name: proc.pid for name, (proc, _) in servers.items()}, args.quick))
        finally:
            for proc, _ in servers.values():
                stop(proc)
        run_sticky(root, args.quick, local)


if __name__ == "__main__":
    main()
