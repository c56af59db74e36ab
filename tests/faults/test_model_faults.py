"""Fault injection against real model and analysis server processes on loopback (issue 14).

Each scenario runs `python -m twofold serve-model` (or `serve-analysis`) as a separate process, puts
it under load from a real gRPC client and injects one fault: versions published under load (good,
corrupted, not ONNX, failing their warm-up run), a SIGKILL in the middle of Decide calls, random
bytes and extreme values into every RPC, one large Score among many small Predicts. The figures each
scenario measures are printed (`pytest -s`) and recorded in docs/reliability.md ("Model server").
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from model_server.bandits import PolicyConfig, fit_linear_arms, publish_policy
from model_server.manifest import MODEL_FILE, read_manifest
from model_server.publish import publish
from model_server.training import train_xgboost
from protos.twofold.model.v1 import model_pb2, model_pb2_grpc
from tests.model.conftest import FEATURES, make_data, metric, publish_failing_warm_up, scrape
from twofold.lake import LakeWriter, read_table

ROOT = Path(__file__).resolve().parents[2]
ARMS = ["a", "b", "c", "d"]
# Wide contexts make each decision record costly to encode, so the lake writer is the bottleneck.
CONTEXT_WIDTH = 512


@dataclass
class ServerProcess:
    """A server started as its own process, found through its ready file."""

    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def start_server(tmp_path: Path, command: str, *args: str, name: str = "server") -> ServerProcess:
    """Start `twofold <command> ... --port 0` and wait (at most 60 s) for its ready file."""
    ready = tmp_path / f"{name}.ready.json"
    log_path = tmp_path / f"{name}.log"
    ready.unlink(missing_ok=True)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "twofold", command, *args, "--host", "127.0.0.1", "--port", "0",
             "--metrics-port", "0", "--ready-file", str(ready), "--grace-seconds", "5"],
            cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"{command} exited {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{command} did not become ready:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.05)
    info = json.loads(ready.read_text())
    return ServerProcess(proc, info["port"], info["metrics_port"], log_path)


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    """Every server a test starts is stopped (SIGTERM, then SIGKILL) when it ends."""
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.stop()


def dense(x: np.ndarray) -> model_pb2.DenseRows:
    x = np.ascontiguousarray(x, dtype="<f4")
    return model_pb2.DenseRows(data=x.tobytes(), rows=x.shape[0], cols=x.shape[1])


@dataclass
class Call:
    """One finished call: when it was sent and answered (monotonic seconds), and how it ended."""

    sent: float
    done: float
    code: grpc.StatusCode
    key: str = ""


@dataclass
class Load:
    """Calls from `concurrency` asyncio tasks over one channel, in a thread, until `stop()`."""

    target: str
    make_call: Callable[[grpc.aio.Channel, int], object]  # returns an awaitable giving the call's key
    concurrency: int
    calls: list[Call] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Load:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[Call]:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(60)
        return self.calls

    async def _run(self) -> None:
        counter = iter(range(10**9))
        async with grpc.aio.insecure_channel(self.target) as channel:
            async def worker() -> None:
                while not self._stop.is_set():
                    i = next(counter)
                    sent = time.monotonic()
                    try:
                        key = await self.make_call(channel, i)  # type: ignore[misc]
                        self.calls.append(Call(sent, time.monotonic(), grpc.StatusCode.OK, str(key)))
                    except grpc.aio.AioRpcError as error:
                        self.calls.append(Call(sent, time.monotonic(), error.code()))
            await asyncio.gather(*(worker() for _ in range(self.concurrency)))


def failed(calls: list[Call]) -> list[Call]:
    return [c for c in calls if c.code != grpc.StatusCode.OK]


# -- SIGKILL during Decide ------------------------------------------------------------------------

# The decision log's documented window (docs/model_server.md, Decision log): a decision answered
# more than this long before a SIGKILL is in the lake after recovery.
DECISION_WINDOW_S = 0.1


def wide_policy(root: Path) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, CONTEXT_WIDTH))
    arms = rng.integers(0, len(ARMS), 500)
    rewards = (rng.random(500) < 0.5).astype(np.float64)
    publish_policy(repository=root, name="wide", arms=ARMS, feature_names=[f"c{i}" for i in range(CONTEXT_WIDTH)],
                   stats=fit_linear_arms(x, arms, rewards, len(ARMS)), config=PolicyConfig(policy="linucb"))


def test_sigkill_during_decide_loses_no_decision_answered_before_the_window(tmp_path: Path,
                                                                            servers: list[ServerProcess]) -> None:
    repo, lake = tmp_path / "repo", tmp_path / "lake"
    wide_policy(repo)
    context = dense(np.random.default_rng(4).normal(size=(1, CONTEXT_WIDTH)))
    lost_total, answered_total, kills, worst_age = 0, 0, 0, 0.0
    for round_ in range(2):
        server = start_server(tmp_path, "serve-model", "--repository", str(repo), "--lake", str(lake),
                              name=f"decide-{round_}")
        servers.append(server)

        async def decide(channel: grpc.aio.Channel, i: int, tag: str = f"r{round_}") -> str:
            stub = model_pb2_grpc.ModelServiceStub(channel)
            response = await stub.Decide(model_pb2.DecideRequest(
                model="wide", unit=f"u{i}", decision_id=f"{tag}-{i}", dense=context), timeout=10)
            return response.decision_id

        load = Load(server.target, decide, concurrency=48).start()
        time.sleep(3.0)
        killed_at = time.monotonic()
        server.proc.send_signal(signal.SIGKILL)
        calls = load.stop()
        server.proc.wait(10)
        kills += 1
        # Recovery: a new writer on the same lake publishes the dead writer's write-ahead log.
        recovery = LakeWriter(root=lake, table="decisions")
        recovery.start_sync()
        recovery.close_sync()
        stored = set(read_table(lake, "decisions").column("decision_id").to_pylist())
        answered = [c for c in calls if c.code == grpc.StatusCode.OK and c.done <= killed_at]
        lost = [c for c in answered if c.key not in stored]
        old_lost = [c for c in lost if killed_at - c.done > DECISION_WINDOW_S]
        answered_total += len(answered)
        lost_total += len(lost)
        worst_age = max([worst_age, *(killed_at - c.done for c in lost)])
        print(f"\nSIGKILL round {round_}: {len(answered)} decisions answered, {len(lost)} not in Parquet "
              f"(oldest answered {max((killed_at - c.done for c in lost), default=0) * 1000:.0f} ms before the kill)")
        assert not old_lost, (f"{len(old_lost)} decisions answered more than {DECISION_WINDOW_S * 1000:.0f} ms "
                              f"before the SIGKILL are missing, the oldest "
                              f"{max(killed_at - c.done for c in old_lost) * 1000:.0f} ms")
    print(f"SIGKILL during Decide: {kills} kills, {answered_total} answered, {lost_total} lost, all within "
          f"{worst_age * 1000:.0f} ms of the kill")
