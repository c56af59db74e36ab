"""What the SDK adds: `decide()` against the raw RPCs it makes, remote versus local evaluation.

Starts a real assignment server and a real model server (serving the demo's XGBoost ranker and
LinUCB bandit) as separate processes, then measures in the same run:

- blocking, one call in flight: the raw gRPC calls a `decide()` makes (ResolveFlags, then
  Score or Decide, prebuilt requests on a plain channel) against `Client.decide()` doing the
  same work (building requests, reading answers, queueing the exposure); and `decide()` with
  local evaluation, whose only call is the model call;
- resolve alone: raw ResolveFlags against `Client.resolve()` remote and local;
- asyncio, 16 calls in flight: raw calls against `AsyncClient.decide()` remote and local.

Ratios are against the raw calls measured in the same run, on the same servers.

    python -m bench.sdk [--calls 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.common import LoadResult, measure, print_table
from client_sdk import AsyncClient, Client, ClientOptions
from client_sdk.convert import dense_rows, now_timestamp, python_to_struct
from protos.twofold.assignment.v1 import assignment_pb2 as apb
from protos.twofold.assignment.v1 import assignment_pb2_grpc
from protos.twofold.model.v1 import model_pb2, model_pb2_grpc
from twofold.demo import world
from twofold.demo.processes import ServerGroup
from twofold.demo.train import train_systems

SECRET = "bench-secret"
FLAGS = """\
flag: ranked
variants:
  ranker: {system: model, model: home-ranker, top_k: 1}
rules:
  - name: everyone
    serve: ranker
---
flag: bandit
variants:
  bandit: {system: bandit, model: home-linucb}
rules:
  - name: everyone
    serve: bandit
---
flag: static
variants:
  editorial: {system: static, theme: editorial}
rules:
  - name: everyone
    serve: editorial
---
client: bench
secrets:
  - secret: bench-secret
"""
# Every call uses a new unit, so each decide() really queues an exposure (a repeat would be
# deduplicated in the client and cost nothing); feature rows cycle over FEATURE_ROWS users.
FEATURE_ROWS = 512


class Units:
    """Fresh unit names (never repeated within a run) and their prebuilt raw requests."""

    def __init__(self, users: np.ndarray) -> None:
        self.users = users
        self.next = 0

    def take(self) -> tuple[str, np.ndarray]:
        i = self.next
        self.next += 1
        return f"user-{i}", self.users[i % len(self.users)]


def _timed(fn: Callable[[], object], calls: int, warmup: int = 200) -> tuple[float, float]:
    """(p50 µs, p99 µs) of `fn()` called `calls` times in a row after a warm-up."""
    for _ in range(warmup):
        fn()
    samples = np.empty(calls)
    for i in range(calls):
        t0 = time.perf_counter()
        fn()
        samples[i] = time.perf_counter() - t0
    return float(np.percentile(samples, 50) * 1e6), float(np.percentile(samples, 99) * 1e6)


def _resolve_request(flag: str, unit: str) -> apb.ResolveFlagsRequest:
    return apb.ResolveFlagsRequest(flags=[f"flags/{flag}"], client_secret=SECRET,
                                   evaluation_context=python_to_struct({"targeting_key": unit}))


def _score_request(x: np.ndarray) -> model_pb2.ScoreRequest:
    return model_pb2.ScoreRequest(model="home-ranker", candidates=dense_rows(world.candidates()),
                                  context=dense_rows(x), top_k=1)


def _decide_request(unit: str, x: np.ndarray) -> model_pb2.DecideRequest:
    return model_pb2.DecideRequest(model="home-linucb", unit=unit, decision_id=uuid.uuid4().hex, dense=dense_rows(x))


def blocking(assignment: str, model: str, units: Units, calls: int) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    candidates = world.candidates()
    # `held` keeps its exposures queued until after the measurement: its figure is the request
    # path alone, without the background ApplyFlags traffic competing for the two cores.
    held_options = ClientOptions(flush_at_exit=False, channels=1, flush_interval=3600, batch_size=10**6,
                                 max_buffered=10**7)
    with grpc.insecure_channel(assignment) as a_channel, grpc.insecure_channel(model) as m_channel, \
            Client(assignment, model, SECRET, options=ClientOptions(flush_at_exit=False, channels=1)) as remote, \
            Client(assignment, model, SECRET, options=held_options) as held, \
            Client(assignment, model, SECRET, options=ClientOptions(flush_at_exit=False, channels=1,
                                                                    local_evaluation=True)) as local:
        assert local.wait_for_state(10), "no state from the assignment server"
        resolver = assignment_pb2_grpc.FlagResolverServiceStub(a_channel)
        models = model_pb2_grpc.ModelServiceStub(m_channel)

        def raw(flag: str, method: str | None) -> Callable[[], object]:
            # The same calls decide() makes, from plain stubs: the floor for the request path.
            def call() -> object:
                unit, x = units.take()
                resolver.ResolveFlags(_resolve_request(flag, unit), timeout=5)
                if method == "Score":
                    return models.Score(_score_request(x), timeout=5)
                if method == "Decide":
                    return models.Decide(_decide_request(unit, x), timeout=5)
                return None
            return call

        def raw_model(method: str) -> Callable[[], object]:
            def call() -> object:
                unit, x = units.take()
                if method == "Score":
                    return models.Score(_score_request(x), timeout=5)
                return models.Decide(_decide_request(unit, x), timeout=5)
            return call

        def sdk(client: Client, flag: str) -> Callable[[], object]:
            def call() -> object:
                unit, x = units.take()
                return client.decide(flag, unit, features=x, candidates=candidates)
            return call

        cases = [("static arm", "static", None), ("ranker arm", "ranked", "Score"), ("bandit arm", "bandit", "Decide")]
        for label, flag, method in cases:
            raw_name = "ResolveFlags" + (f"+{method}" if method else "")
            base = _timed(raw(flag, method), calls)
            mine = _timed(sdk(remote, flag), calls)
            quiet = _timed(sdk(held, flag), calls)
            held.flush()
            loc = _timed(sdk(local, flag), calls)
            rows.append((f"{label}: raw {raw_name}", base[0], base[1], "1.00x"))
            rows.append((f"{label}: decide() remote", mine[0], mine[1], f"{mine[0] / base[0]:.2f}x"))
            rows.append((f"{label}: decide() remote, exposures held", quiet[0], quiet[1],
                         f"{quiet[0] / base[0]:.2f}x"))
            if method:
                alone = _timed(raw_model(method), calls)
                rows.append((f"{label}: raw {method} alone", alone[0], alone[1], f"{alone[0] / base[0]:.2f}x"))
            rows.append((f"{label}: decide() local", loc[0], loc[1], f"{loc[0] / base[0]:.2f}x"))
        remote.flush()
        local.flush()
    return rows


def in_process_resolve(assignment: str, units: Units, calls: int) -> tuple[float, float]:
    """p50 and p99 µs of a local-evaluation `resolve()` (no network at all)."""
    with Client(assignment, client_secret=SECRET, options=ClientOptions(flush_at_exit=False,
                                                                         local_evaluation=True)) as local:
        assert local.wait_for_state(10)
        return _timed(lambda: local.resolve("ranked", units.take()[0]), calls)


async def concurrent(assignment: str, model: str, units: Units, calls: int, concurrency: int) -> list[LoadResult]:
    candidates = world.candidates()
    results = []
    async with grpc.aio.insecure_channel(assignment) as a_channel, grpc.aio.insecure_channel(model) as m_channel:
        resolver = assignment_pb2_grpc.FlagResolverServiceStub(a_channel)
        models = model_pb2_grpc.ModelServiceStub(m_channel)

        async def raw() -> None:
            unit, x = units.take()
            await resolver.ResolveFlags(_resolve_request("ranked", unit), timeout=5)
            await models.Score(_score_request(x), timeout=5)

        async def raw_with_apply() -> None:
            # Plus the exposure a remote decide() eventually sends (off its request path): one
            # ApplyFlags per resolve token, since a request carries one token.
            unit, x = units.take()
            response = await resolver.ResolveFlags(_resolve_request("ranked", unit), timeout=5)
            await models.Score(_score_request(x), timeout=5)
            request = apb.ApplyFlagsRequest(client_secret=SECRET, resolve_token=response.resolve_token,
                                            flags=[apb.AppliedFlag(flag="flags/ranked", apply_time=now_timestamp())])
            request.send_time.CopyFrom(now_timestamp())
            await resolver.ApplyFlags(request, timeout=5)

        results.append(await measure("raw ResolveFlags+Score", raw, concurrency=concurrency, calls=calls))
        results.append(await measure("raw ResolveFlags+Score+ApplyFlags", raw_with_apply, concurrency=concurrency,
                                     calls=calls))
    for local in (False, True):
        options = ClientOptions(flush_at_exit=False, local_evaluation=local)
        async with AsyncClient(assignment, model, SECRET, options=options) as client:
            assert await client.wait_for_state(10)

            async def decide(client: AsyncClient = client) -> None:
                unit, x = units.take()
                await client.decide("ranked", unit, features=x, candidates=candidates)

            name = f"AsyncClient.decide() {'local' if local else 'remote'}"
            results.append(await measure(name, decide, concurrency=concurrency, calls=calls))
            await client.flush()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls per measurement")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="twofold-bench-sdk-"))
    (folder / "flags").mkdir()
    (folder / "flags" / "flags.yaml").write_text(FLAGS)
    (folder / "token.key").write_text(base64.b64encode(os.urandom(32)).decode())
    train_systems(folder / "repository", rows=4000)
    units = Units(world.sample_users(FEATURE_ROWS, np.random.default_rng(0)))
    with ServerGroup(folder / "logs") as group:
        assignment = group.start("assignment", [
            "serve-assignment", "--flags", str(folder / "flags"), "--lake", str(folder / "lake"),
            "--token-key-file", str(folder / "token.key"), "--materializations", "memory"])
        model = group.start("model", ["serve-model", "--repository", str(folder / "repository"),
                                      "--lake", str(folder / "lake")])
        print(f"blocking client, 1 call in flight, {args.calls} calls each (µs per decide):")
        rows = blocking(assignment.target, model.target, units, args.calls)
        print_table(rows, ("measurement", "p50 µs", "p99 µs", "p50 vs raw"))
        p50, p99 = in_process_resolve(assignment.target, units, args.calls)
        print(f"\nlocal-evaluation resolve() in process: p50 {p50:.1f} µs, p99 {p99:.1f} µs")
        print(f"\nasyncio, {args.concurrency} in flight, ranker arm:")
        loads = asyncio.run(concurrent(assignment.target, model.target, units, args.calls, args.concurrency))
        base = loads[0]
        print_table([(r.name, r.p50_us, r.p99_us, r.throughput, f"{r.throughput / base.throughput:.2f}x")
                     for r in loads], ("measurement", "p50 µs", "p99 µs", "decides/s", "tput vs raw"))
    print(f"\n(machine load average at the end: {statistics.fmean(os.getloadavg()):.1f})")


if __name__ == "__main__":
    main()
