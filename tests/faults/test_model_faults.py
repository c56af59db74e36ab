"""Fault injection against real model and analysis server processes on loopback (issue 14).

Each scenario runs `python -m twofold serve-model` (or `serve-analysis`) as a separate process, puts
it under load from a real gRPC client and injects one fault: versions published under load (good,
corrupted, not ONNX, failing their warm-up run), a SIGKILL in the middle of Decide calls, random
bytes and extreme values into every RPC, one large Score among many small Predicts. The figures each
scenario measures are printed (`pytest -s`) and recorded in docs/reliability.md ("Model server").
To see a scenario fail on older code, point FAULTS_SERVER_ROOT at another checkout: its servers run
from there (e.g. `FAULTS_SERVER_ROOT=/path/to/old/checkout pytest tests/faults/test_model_faults.py`).
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
from collections import Counter
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

ROOT = Path(os.environ.get("FAULTS_SERVER_ROOT") or Path(__file__).resolve().parents[2])
ARMS = ["a", "b", "c", "d"]
# Wide contexts make each decision record costly to encode (2048 floats), so the lake writer is the
# bottleneck: the condition under which the old hand-over fell behind without bound (up to 367 ms
# measured before the back-pressure, against the ~20 ms documented then).
CONTEXT_WIDTH = 2048


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


# -- publishing under load -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def xgb_sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trained versions to publish from: ranker 1-3 (different tree counts) and other 1-2."""
    root = tmp_path_factory.mktemp("sources")
    x, y = make_data(1000)
    for trees in (10, 20, 30):
        train_xgboost(x, y, name="ranker", repository=root, feature_names=FEATURES, params={"n_estimators": trees})
    for trees in (10, 20):
        train_xgboost(x, y, name="other", repository=root, feature_names=FEATURES, params={"n_estimators": trees})
    return root


def copy_version(sources: Path, root: Path, model: str, version: int) -> str:
    source = sources / model / str(version)
    return publish(root, read_manifest(source), (source / MODEL_FILE).read_bytes()).version


def list_models(target: str) -> dict[str, model_pb2.ModelInfo]:
    with grpc.insecure_channel(target) as channel:
        response = model_pb2_grpc.ModelServiceStub(channel).ListModels(model_pb2.ListModelsRequest(), timeout=10)
    return {m.name: m for m in response.models}


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> float:
    """Seconds until `condition()` held (polled every 20 ms); fails after `timeout`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "condition not reached"
        time.sleep(0.02)
    return time.monotonic() - start


def test_publishing_good_and_broken_versions_under_load_fails_no_call(tmp_path: Path, xgb_sources: Path,
                                                                      servers: list[ServerProcess]) -> None:
    root = tmp_path / "repo"
    copy_version(xgb_sources, root, "ranker", 1)
    copy_version(xgb_sources, root, "other", 1)
    server = start_server(tmp_path, "serve-model", "--repository", str(root), "--lake", "none",
                          "--poll-seconds", "0.2", name="publish")
    servers.append(server)
    rows = dense(make_data(4, seed=9)[0])

    async def predict(channel: grpc.aio.Channel, i: int) -> str:
        stub = model_pb2_grpc.ModelServiceStub(channel)
        model = "ranker" if i % 2 else "other"
        response = await stub.Predict(model_pb2.PredictRequest(model=model, dense=rows), timeout=10)
        return f"{model}:{response.version}"

    before = scrape(server.metrics_port)
    load = Load(server.target, predict, concurrency=16).start()
    ranker_dir = root / "ranker"
    time.sleep(0.5)
    published = {"good": [copy_version(xgb_sources, root, "ranker", 2)]}
    time.sleep(0.6)
    # Corrupted: the model's bytes no longer match the manifest's checksum.
    corrupt = copy_version(xgb_sources, root, "ranker", 1)
    data = bytearray((ranker_dir / corrupt / MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ranker_dir / corrupt / MODEL_FILE).write_bytes(bytes(data))
    time.sleep(0.6)
    not_onnx = publish(root, read_manifest(xgb_sources / "ranker" / "1"), b"not an onnx graph").version
    time.sleep(0.6)
    warm_up = publish_failing_warm_up(root, xgb_sources / "ranker" / "1")
    time.sleep(0.6)
    # Another model keeps updating while ranker's newest version is the refused one...
    published["other"] = [copy_version(xgb_sources, root, "other", 2)]
    other_pickup = wait_for(lambda: list_models(server.target)["other"].default_version == published["other"][-1],
                            timeout=5)
    # ...and so does ranker, with its next good version.
    published["good"].append(copy_version(xgb_sources, root, "ranker", 3))
    pickup = wait_for(lambda: list_models(server.target)["ranker"].default_version == published["good"][-1],
                      timeout=5)
    time.sleep(0.3)
    calls = load.stop()
    after = scrape(server.metrics_port)
    served = Counter(c.key for c in calls if c.code == grpc.StatusCode.OK)
    print(f"\npublish under load: {len(calls)} Predicts, {len(failed(calls))} failed; served {dict(served)}; "
          f"other's new version served {other_pickup:.2f} s after its publish (poll 0.2 s), ranker's "
          f"next good one {pickup:.2f} s after")
    assert not failed(calls), Counter(c.code for c in failed(calls))
    assert {k for k in served if k.startswith("ranker:")} <= {"ranker:1", *(f"ranker:{v}" for v in published["good"])}
    assert served[f"ranker:{published['good'][-1]}"] > 0 and served[f"other:{published['other'][-1]}"] > 0
    refusals = (metric(after, "twofold_model_load_failures_total", model="ranker")
                - metric(before, "twofold_model_load_failures_total", model="ranker"))
    assert refusals == 3
    listed = list_models(server.target)["ranker"]
    reasons = {v.version: v.error for v in listed.refused_versions}
    assert set(reasons) == {corrupt, not_onnx, warm_up}, reasons
    assert "sha256" in reasons[corrupt].lower() and "Reshape" in reasons[warm_up], reasons
    assert server.proc.poll() is None

    # Startup: the newest version fails its warm-up; the server starts and serves the one before.
    assert server.stop() == 0
    newest_broken = publish_failing_warm_up(root, xgb_sources / "ranker" / "1")
    started = time.monotonic()
    restarted = start_server(tmp_path, "serve-model", "--repository", str(root), "--lake", "none",
                             name="restart")
    servers.append(restarted)
    startup = time.monotonic() - started
    listed_now = list_models(restarted.target)
    assert listed_now["ranker"].default_version == published["good"][-1]
    assert [v.version for v in listed_now["ranker"].refused_versions] == [newest_broken]
    body = scrape(restarted.metrics_port)
    assert metric(body, "twofold_model_load_failures_total", model="ranker") == 1
    print(f"restart with a newest version failing its warm-up: ready in {startup:.2f} s, serving "
          f"ranker {listed_now['ranker'].default_version}")


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
                   stats=fit_linear_arms(x, arms, rewards, len(ARMS)), config=PolicyConfig(policy="epsilon-greedy"))


def test_sigkill_during_decide_loses_no_decision_answered_before_the_window(tmp_path: Path,
                                                                            servers: list[ServerProcess]) -> None:
    repo, lake = tmp_path / "repo", tmp_path / "lake"
    wide_policy(repo)
    context = dense(np.random.default_rng(4).normal(size=(1, CONTEXT_WIDTH)))
    lost_total, answered_total, kills, worst_age = 0, 0, 0, 0.0
    for round_ in range(3):
        server = start_server(tmp_path, "serve-model", "--repository", str(repo), "--lake", str(lake),
                              name=f"decide-{round_}")
        servers.append(server)

        async def decide(channel: grpc.aio.Channel, i: int, tag: str = f"r{round_}") -> str:
            stub = model_pb2_grpc.ModelServiceStub(channel)
            response = await stub.Decide(model_pb2.DecideRequest(
                model="wide", unit=f"u{i}", decision_id=f"{tag}-{i}", dense=context), timeout=10)
            return response.decision_id

        load = Load(server.target, decide, concurrency=64).start()
        time.sleep(2.5)
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
        # Back-pressure makes calls wait for the writer; under this load none is refused.
        assert not failed([c for c in calls if c.done < killed_at]), Counter(c.code for c in failed(calls))
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
