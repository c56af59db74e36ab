"""How close to the bare echo a handler can get: the servers with their handlers cut down, in one run.

The goals of issues 3 and 4 compare whole servers with a bare `grpc.aio` echo. This benchmark
shows what part of the gap any conforming handler must pay, by running the real servers (same
process setup, runtime, metrics and response sizes) with one handler replaced:

- ResolveFlags, prebuilt: returns one response built at the first call (the floor of the
  runtime and the response size);
- ResolveFlags, prebuilt + seal: the same plus sealing one resolve token per call (AES-GCM over
  a 150-byte payload), which the issue requires of every resolve;
- ResolveFlags: the real handler;
- Predict, prebuilt / prebuilt + model: one prebuilt response, then also one ONNX Runtime run of
  the request's row per call (coalescing off), the one step no Predict can skip;
- Predict: the real handler, with coalescing off and on (the server's default);
- Decide, prebuilt / prebuilt + policy run (a new decision id's randomness and one run of the
  LinUCB graph per call) / the real handler (coalescing and the decision log on, as deployed).

Each server is its own process, started as `python -m bench.floors --serve MODE twofold-args...`,
which patches the handler and then runs `twofold.cli.main`. Calls alternate between servers in
rounds, as in the other benchmarks, and ratios are to the echo of the same round set.

    python -m bench.floors [--calls 6000] [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from bench.common import ROOT, print_table, spawn, stop
from bench.model_server import build_repository, interleaved, rows

MODES = ("resolve-prebuilt", "resolve-seal", "resolve", "predict-prebuilt", "predict-model", "predict-inline",
         "predict", "decide-prebuilt", "decide-model", "decide")


def _patch(mode: str) -> None:
    """Replace a handler in this (server) process before the server registers it."""
    if mode.startswith("resolve-"):
        from assignment_server.service import FlagResolverServicer

        real = FlagResolverServicer.ResolveFlags
        built: dict[str, Any] = {}

        async def resolve(self: FlagResolverServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
            if "response" not in built:
                built["response"] = await real(self, request, context)
            response = built["response"]
            if mode == "resolve-seal":
                response.resolve_token = self.tokens._aead.encrypt(self.tokens._nonce(), b"p" * 150, b"floor")
            return response

        FlagResolverServicer.ResolveFlags = resolve  # type: ignore[method-assign]
    elif mode in ("predict-prebuilt", "predict-model", "decide-prebuilt", "decide-model"):
        import numpy as np

        from model_server.service import ModelServicer, new_decision_id

        method = "Predict" if mode.startswith("predict") else "Decide"
        real_method = getattr(ModelServicer, method)
        cache: dict[str, Any] = {}

        async def handler(self: ModelServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
            if "response" not in cache:
                cache["response"] = await real_method(self, request, context)
            if mode.endswith("-model"):
                model = self.repository.get(request.model, request.version)
                x = np.ndarray((1, request.dense.cols), np.float32, request.dense.data)
                model.predict(x) if method == "Predict" else model.decide(x, new_decision_id())
            return cache["response"]

        setattr(ModelServicer, method, handler)


def _serve(mode: str, args: list[str]) -> int:
    _patch(mode)
    from twofold.cli import main

    return main(args)


def _start(mode: str, folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    local = ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--log-level", "error"]
    if mode.startswith("resolve"):
        from bench.assignment import _flags_dir

        args = ["serve-assignment", "--flags", str(_flags_dir(folder / mode)), "--lake", str(folder / mode / "lake"),
                "--materializations", "memory"]
    else:
        args = ["serve-model", "--repository", str(folder / "repo"), "--lake", str(folder / mode / "lake"),
                *([] if mode in ("predict", "decide") else ["--coalesce-window-ms", "0"])]
    ready = folder / f"{mode}.ready.json"
    proc = subprocess.Popen([sys.executable, "-m", "bench.floors", "--serve", mode, *args, *local,
                             "--ready-file", str(ready)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"server {mode} did not start")
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())["port"]


def _requests() -> dict[str, Any]:
    """The request each family sends (the echo gets a payload of the same size)."""
    from assignment_server.authoring.compiler import DEFAULT_CLIENT_SECRET
    from protos.twofold.assignment.v1 import assignment_pb2 as pb
    from protos.twofold.model.v1 import model_pb2

    resolve = pb.ResolveFlagsRequest(flags=["flags/home-ranking"], client_secret=DEFAULT_CLIENT_SECRET)
    resolve.evaluation_context.update({"targeting_key": "user-42", "country": "SE", "email": "a@b.com"})
    return {"resolve": resolve, "predict": model_pb2.PredictRequest(model="ranker", dense=rows(1)),
            "decide": model_pb2.DecideRequest(model="bandit", unit="user-42", dense=rows(1))}


async def _run(family: str, request: Any, ports: dict[str, int], echo_port: int, calls: int,
               rounds: int) -> list[tuple[object, ...]]:
    from protos.twofold.assignment.v1 import assignment_pb2_grpc as pb_grpc
    from protos.twofold.echo.v1 import echo_pb2, echo_pb2_grpc
    from protos.twofold.model.v1 import model_pb2_grpc

    channels = {name: grpc.aio.insecure_channel(f"127.0.0.1:{port}") for name, port in ports.items()}
    echo_channel = grpc.aio.insecure_channel(f"127.0.0.1:{echo_port}")
    try:
        echo = echo_pb2_grpc.EchoServiceStub(echo_channel)
        echo_request = echo_pb2.EchoRequest(payload=request.SerializeToString())
        group: dict[str, Callable[[], Awaitable[object]]] = {"bare echo": lambda: echo.Echo(echo_request)}
        for name, channel in channels.items():
            if family == "resolve":
                group[name] = pb_grpc.FlagResolverServiceStub(channel).ResolveFlags
            else:
                stub = model_pb2_grpc.ModelServiceStub(channel)
                group[name] = stub.Predict if family == "predict" else stub.Decide
        calls_of = {name: (fn if name == "bare echo" else (lambda f=fn: f(request))) for name, fn in group.items()}
        table: list[tuple[object, ...]] = []
        for concurrency in (1, 32):
            got = {r.name: r for r in await interleaved(calls_of, concurrency, calls, rounds)}
            base = got["bare echo"]
            for name, result in got.items():
                p50, tput = result.ratio_to(base)
                table.append((name, concurrency, result.p50_us, result.throughput, f"{p50:.2f}x", f"{tput:.2f}x"))
        return table
    finally:
        for channel in [*channels.values(), echo_channel]:
            await channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=6000, help="calls per server and concurrency, over all rounds")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.serve:
        sys.exit(_serve(args.serve, rest))
    folder = Path(tempfile.mkdtemp(prefix="twofold-bench-floors-"))
    build_repository(folder / "repo")
    labels = {"resolve-prebuilt": "resolve: prebuilt response", "resolve-seal": "resolve: prebuilt + token seal",
              "resolve": "resolve: real handler", "predict-prebuilt": "predict: prebuilt response",
              "predict-model": "predict: prebuilt + model run", "predict-inline": "predict: real, coalescing off",
              "predict": "predict: real, coalescing on", "decide-prebuilt": "decide: prebuilt response",
              "decide-model": "decide: prebuilt + policy run", "decide": "decide: real (decision log on)"}
    table: list[tuple[object, ...]] = []
    echo, echo_info = spawn(["serve-echo", "--bare", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1"])
    try:
        for family, request in _requests().items():
            # Only this family's servers run meanwhile: idle servers still poll and compact.
            servers = {mode: _start(mode, folder) for mode in MODES if mode.split("-")[0] == family}
            try:
                table += asyncio.run(_run(family, request, {m: port for m, (_, port) in servers.items()},
                                          echo_info["port"], args.calls, args.rounds))
            finally:
                for proc, _ in servers.values():
                    stop(proc)
    finally:
        stop(echo)
    print(f"handlers cut down vs a bare grpc.aio echo, {args.calls} calls per row in {args.rounds} rounds")
    print_table([(labels.get(str(r[0]), r[0]), *r[1:]) for r in table],
                ("server", "conc", "p50 µs", "calls/s", "p50 vs echo", "tput vs echo"))
    print("latencies pooled over the rounds; goals: ResolveFlags p50 <= 1.2x; "
          "Predict and Decide p50 <= 1.15x, throughput >= 0.85x")


if __name__ == "__main__":
    main()
