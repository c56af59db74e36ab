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
import zlib
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


def _f32(*values: float) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


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
        backlog = []
        for _ in range(10):
            time.sleep(0.25)
            body = scrape(server.metrics_port)
            assert "twofold_model_decision_log_backlog " in body  # the gauge SREs watch
            backlog.append(metric(body, "twofold_model_decision_log_backlog"))
        waits = metric(body, "twofold_model_decision_log_waits_total")
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
              f"(oldest answered {max((killed_at - c.done for c in lost), default=0) * 1000:.0f} ms before the kill); "
              f"backlog gauge up to {max(backlog):.0f} records, {waits:.0f} calls waited for the writer")
        assert not old_lost, (f"{len(old_lost)} decisions answered more than {DECISION_WINDOW_S * 1000:.0f} ms "
                              f"before the SIGKILL are missing, the oldest "
                              f"{max(killed_at - c.done for c in old_lost) * 1000:.0f} ms")
    print(f"SIGKILL during Decide: {kills} kills, {answered_total} answered, {lost_total} lost, all within "
          f"{worst_age * 1000:.0f} ms of the kill")


# -- one large Score among many small Predicts ---------------------------------------------------

def test_a_large_score_does_not_hold_up_small_predicts(tmp_path: Path, xgb_sources: Path,
                                                       servers: list[ServerProcess]) -> None:
    """Small Predicts keep their latency while 90,000-candidate Scores run (in the batch pool)."""
    root = tmp_path / "repo"
    copy_version(xgb_sources, root, "ranker", 3)  # 30 trees
    server = start_server(tmp_path, "serve-model", "--repository", str(root), "--lake", "none", name="score")
    servers.append(server)
    row = dense(make_data(1, seed=11)[0])
    candidates = dense(make_data(90_000, seed=12)[0])

    async def predict(channel: grpc.aio.Channel, i: int) -> str:
        await model_pb2_grpc.ModelServiceStub(channel).Predict(model_pb2.PredictRequest(model="ranker", dense=row),
                                                               timeout=20)
        return ""

    async def score(channel: grpc.aio.Channel, i: int) -> str:
        response = await model_pb2_grpc.ModelServiceStub(channel).Score(
            model_pb2.ScoreRequest(model="ranker", candidates=candidates, top_k=10), timeout=30)
        assert len(response.scores) == 90_000
        return ""

    def latencies(calls: list[Call], since: float = 0.0) -> np.ndarray:
        return np.array([c.done - c.sent for c in calls if c.code == grpc.StatusCode.OK and c.sent >= since])

    alone = Load(server.target, predict, concurrency=4).start()
    time.sleep(1.5)
    baseline = latencies(alone.stop())
    small = Load(server.target, predict, concurrency=4).start()
    time.sleep(0.3)
    scores_started = time.monotonic()
    large = Load(server.target, score, concurrency=1).start()
    time.sleep(3.0)
    score_calls = large.stop()
    during = small.stop()
    assert not failed(score_calls) and not failed(during)
    score_latency = latencies(score_calls)
    mixed = latencies([c for c in during if c.sent < score_calls[-1].done], since=scores_started)
    p50, p99, worst = np.percentile(mixed, 50), np.percentile(mixed, 99), mixed.max()
    print(f"\nlarge Score among small Predicts: {len(score_latency)} Scores of 90,000 candidates, "
          f"{np.median(score_latency) * 1000:.0f} ms each (median); Predict alone p50 "
          f"{np.median(baseline) * 1000:.1f} ms p99 {np.percentile(baseline, 99) * 1000:.1f} ms; "
          f"with the Scores p50 {p50 * 1000:.1f} ms p99 {p99 * 1000:.1f} ms max {worst * 1000:.1f} ms "
          f"({len(mixed)} Predicts)")
    # On the event loop, every Predict that arrives during a Score waits for all of it: p99 would be
    # at least the Score's length. Off the loop they share the CPU with it but do not queue behind it.
    assert np.median(score_latency) > 0.05, "the Score is too short to tell"
    assert p99 < 0.5 * np.median(score_latency), (p99, np.median(score_latency))


# -- random bytes and extreme values into every model and analysis RPC ----------------------------

MODEL_SERVICE = "twofold.model.v1.ModelService"
OIP_SERVICE = "inference.GRPCInferenceService"
ANALYSIS_SERVICE = "twofold.analysis.v1.AnalysisService"
# Answers a server may give to garbage: anything but UNKNOWN or INTERNAL (which mean "a bug here").
ACCEPTABLE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION}


def _rpcs() -> dict[str, type]:
    """Every RPC of the model and analysis servers and its request message type."""
    from protos.inference import grpc_service_pb2
    from protos.twofold.analysis.v1 import analysis_pb2

    found: dict[str, type] = {}
    for module in (model_pb2, grpc_service_pb2, analysis_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                found[f"/{service.full_name}/{method.name}"] = getattr(module, method.input_type.name)
    return found


RPCS = _rpcs()


def test_every_model_and_analysis_rpc_is_fuzzed() -> None:
    """The fuzz below covers every RPC these servers have (a new RPC is fuzzed without a test edit)."""
    names = {path.rsplit("/", 1)[1] for path in RPCS}
    assert {"Predict", "Score", "Decide", "ListModels", "ModelInfer", "ModelMetadata", "ServerLive",
            "ComputeFromStatistics", "GetResults", "ListExperiments"} <= names
    assert {path.split("/")[1] for path in RPCS} == {MODEL_SERVICE, OIP_SERVICE, ANALYSIS_SERVICE}


@dataclass
class Answer:
    code: grpc.StatusCode
    details: str


def raw_call(channel: grpc.Channel, path: str, payload: bytes) -> Answer:
    """Send `payload` as the request's bytes, whatever they are."""
    call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    try:
        call(payload, timeout=20)
        return Answer(grpc.StatusCode.OK, "")
    except grpc.RpcError as error:
        return Answer(error.code(), error.details() or "")  # type: ignore[attr-defined]


def decodes(message: type, payload: bytes) -> bool:
    from google.protobuf.message import DecodeError

    try:
        message.FromString(payload)  # type: ignore[attr-defined]
        return True
    except DecodeError:
        return False


@pytest.fixture(scope="module")
def fuzz_targets(tmp_path_factory: pytest.TempPathFactory, xgb_sources: Path) -> Iterator[dict[str, ServerProcess]]:
    """A model server (a classifier and a LinUCB policy, decisions logged) and an analysis server."""
    tmp = tmp_path_factory.mktemp("fuzz")
    repo = tmp / "repo"
    copy_version(xgb_sources, repo, "ranker", 1)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 3))
    arms = rng.integers(0, 3, 300)
    publish_policy(repository=repo, name="linucb", arms=ARMS[:3], feature_names=["r", "f", "m"],
                   stats=fit_linear_arms(x, arms, (rng.random(300) < 0.5).astype(float), 3),
                   config=PolicyConfig(policy="linucb"))
    (tmp / "experiments").mkdir()
    started = {"model": start_server(tmp, "serve-model", "--repository", str(repo), "--lake", str(tmp / "lake"),
                                     name="fuzz-model"),
               "analysis": start_server(tmp, "serve-analysis", "--experiments", str(tmp / "experiments"),
                                        "--lake", str(tmp / "lake"), name="fuzz-analysis")}
    yield started
    for server in started.values():
        server.stop()


def target_of(path: str, servers: dict[str, ServerProcess]) -> str:
    return servers["analysis" if path.startswith(f"/{ANALYSIS_SERVICE}/") else "model"].target


def seed_requests() -> dict[str, bytes]:
    """One valid request per RPC that takes fields, for the mutations below to start from."""
    from protos.inference import grpc_service_pb2 as oip
    from protos.twofold.analysis.v1 import analysis_pb2

    row = model_pb2.DenseRows(data=_f32(0.5, 1, 2, 3, 4, 5), rows=1, cols=6)
    context = model_pb2.DenseRows(data=_f32(0.1, 0.2, 1), rows=1, cols=3)
    tensor = oip.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 6])
    stats = {"metrics": [{"name": "m", "kind": "mean", "role": "success",
                          "variants": {"control": {"n": 100, "sum": 50.0, "sum_sq": 40.0},
                                       "treatment": {"n": 100, "sum": 55.0, "sum_sq": 45.0}}}]}
    seeds = {
        f"/{MODEL_SERVICE}/Predict": model_pb2.PredictRequest(model="ranker", dense=row),
        f"/{MODEL_SERVICE}/Score": model_pb2.ScoreRequest(model="ranker", candidates=row, top_k=1),
        f"/{MODEL_SERVICE}/Decide": model_pb2.DecideRequest(model="linucb", unit="u", decision_id="d", dense=context),
        f"/{OIP_SERVICE}/ModelInfer": oip.ModelInferRequest(model_name="ranker", inputs=[tensor],
                                                            raw_input_contents=[_f32(0.5, 1, 2, 3, 4, 5)]),
        f"/{OIP_SERVICE}/ModelMetadata": oip.ModelMetadataRequest(name="ranker", version="1"),
        f"/{OIP_SERVICE}/ModelReady": oip.ModelReadyRequest(name="linucb", version="1"),
        f"/{ANALYSIS_SERVICE}/GetResults": analysis_pb2.GetResultsRequest(experiment="e", include_html=True),
        f"/{ANALYSIS_SERVICE}/ComputeFromStatistics": analysis_pb2.ComputeFromStatisticsRequest(
            input_json=json.dumps(stats)),
    }
    return {path: message.SerializeToString() for path, message in seeds.items()}


SEEDS = seed_requests()


def random_payloads(path: str, count: int, salt: int = 0) -> list[bytes]:
    """Random bytes, and the RPC's valid request with random ASCII written over random positions,
    truncated or extended (seeded by the RPC's name)."""
    rng = np.random.default_rng(zlib.crc32(path.encode()) + salt)
    seed = SEEDS.get(path, b"\x08\x01\x12\x03abc")  # fieldless requests: two unknown fields
    payloads = []
    for i in range(count):
        if i % 2:
            payloads.append(rng.bytes(int(rng.integers(1, 300))))
            continue
        mutated = bytearray(seed)
        for _ in range(int(rng.integers(1, 6))):
            mutated[int(rng.integers(0, len(mutated)))] = int(rng.integers(0x20, 0x7F))
        if rng.random() < 0.2:
            mutated = mutated[:int(rng.integers(0, len(mutated)))]
        elif rng.random() < 0.2:
            mutated += rng.bytes(int(rng.integers(1, 40)))
        payloads.append(bytes(mutated))
    return payloads


@pytest.mark.parametrize("path", sorted(RPCS))
def test_random_bytes_that_decode_never_answer_unknown_or_internal(path: str,
                                                                   fuzz_targets: dict[str, ServerProcess]) -> None:
    """Bytes that happen to be a valid message (of odd content) get a proper answer from the handler."""
    message = RPCS[path]
    payloads = [p for p in random_payloads(path, 400) if decodes(message, p)][:40]
    assert payloads, "no random payload decoded"
    with grpc.insecure_channel(target_of(path, fuzz_targets)) as channel:
        answers = [raw_call(channel, path, p) for p in payloads]
    bad = [a for a in answers if a.code not in ACCEPTABLE]
    assert not bad, f"{path}: {[(a.code, a.details[:200]) for a in bad[:3]]}"
    assert all(s.proc.poll() is None for s in fuzz_targets.values())


# The shared runtime decodes every request itself (twofold.guard), so bytes which are not the
# request message are answered INVALID_ARGUMENT before any model or analysis handler runs.
def test_undecodable_bytes_are_invalid_argument_on_every_rpc(fuzz_targets: dict[str, ServerProcess]) -> None:
    wrong: dict[str, list[Answer]] = {}
    for path, message in sorted(RPCS.items()):
        payloads = [p for p in random_payloads(path, 60, salt=1) if not decodes(message, p)][:10]
        if not payloads:  # a request with no fields accepts almost anything (unknown fields are kept)
            continue
        with grpc.insecure_channel(target_of(path, fuzz_targets)) as channel:
            answers = [raw_call(channel, path, p) for p in payloads]
        off = [a for a in answers if a.code != grpc.StatusCode.INVALID_ARGUMENT]
        if off:
            wrong[path] = off
    assert not wrong, {p: [(a.code, a.details[:120]) for a in answers[:2]] for p, answers in wrong.items()}
    assert all(s.proc.poll() is None for s in fuzz_targets.values())


def _extreme_cases() -> list[tuple[str, str, object, set[grpc.StatusCode], str]]:
    """(case, rpc path, request, acceptable codes, text the error must contain)."""
    from protos.inference import grpc_service_pb2 as oip
    from protos.twofold.analysis.v1 import analysis_pb2

    invalid = {grpc.StatusCode.INVALID_ARGUMENT}
    too_big = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT}
    nan6 = _f32(*([float("nan")] * 6))
    inf3 = _f32(float("inf"), 0.0, 1.0)
    stats = {"metrics": [{"name": "m", "kind": "mean", "role": "success",
                          "variants": {"control": {"n": 100, "sum": 50.0, "sum_sq": 40.0},
                                       "treatment": {"n": 100, "sum": 55.0, "sum_sq": 45.0}}}]}

    def stats_with(**variant: object) -> str:
        doc = json.loads(json.dumps(stats))
        doc["metrics"][0]["variants"]["treatment"].update(variant)
        return json.dumps(doc)

    p, m, a = f"/{MODEL_SERVICE}/", f"/{OIP_SERVICE}/", f"/{ANALYSIS_SERVICE}/"
    dr = model_pb2.DenseRows
    return [
        ("predict rows x cols beyond uint32 products", p + "Predict",
         model_pb2.PredictRequest(model="ranker", dense=dr(data=b"1234", rows=2**32 - 1, cols=2**32 - 1)),
         too_big, "dense"),
        ("predict 0 rows", p + "Predict", model_pb2.PredictRequest(model="ranker", dense=dr(rows=0, cols=6)),
         invalid, "dense"),
        ("predict 200,000 rows", p + "Predict",
         model_pb2.PredictRequest(model="ranker", dense=dr(data=bytes(24 * 200_000), rows=200_000, cols=6)),
         too_big, "dense"),
        ("predict NaN/inf on a policy", p + "Predict",
         model_pb2.PredictRequest(model="linucb", dense=dr(data=inf3, rows=1, cols=3)), invalid, "inf"),
        ("predict named 1e39 (float32 overflow)", p + "Predict",
         model_pb2.PredictRequest(model="linucb", named=model_pb2.NamedFeatures(values={"r": 1e39, "f": 0, "m": 0})),
         invalid, "'r'"),
        ("predict NaN on a tree model (NaN = missing)", p + "Predict",
         model_pb2.PredictRequest(model="ranker", dense=dr(data=nan6, rows=1, cols=6)), {grpc.StatusCode.OK}, ""),
        ("predict a 100,000-character model name", p + "Predict",
         model_pb2.PredictRequest(model="x" * 100_000, dense=dr(data=nan6, rows=1, cols=6)),
         {grpc.StatusCode.NOT_FOUND}, "unknown model"),
        ("score 200,000 candidates", p + "Score",
         model_pb2.ScoreRequest(model="ranker", candidates=dr(data=bytes(24 * 200_000), rows=200_000, cols=6)),
         too_big, "candidates"),
        ("score top_k 2^32-1 and inf", p + "Score",
         model_pb2.ScoreRequest(model="ranker", top_k=2**32 - 1,
                                candidates=dr(data=_f32(*([float("inf")] * 12)), rows=2, cols=6)),
         {grpc.StatusCode.OK}, ""),
        ("score a context of 2 rows", p + "Score",
         model_pb2.ScoreRequest(model="ranker", context=dr(data=_f32(1, 2), rows=2, cols=1),
                                candidates=dr(data=_f32(*range(5)), rows=1, cols=5)), invalid, "context"),
        ("decide inf context", p + "Decide",
         model_pb2.DecideRequest(model="linucb", unit="u", dense=dr(data=inf3, rows=1, cols=3)), invalid, "inf"),
        ("decide 2^32-1 rows", p + "Decide",
         model_pb2.DecideRequest(model="linucb", unit="u", dense=dr(data=inf3, rows=2**32 - 1, cols=3)),
         invalid, "one context row"),
        ("decide a 100 kB decision id and unit", p + "Decide",
         model_pb2.DecideRequest(model="linucb", unit="u" * 100_000, decision_id="d" * 100_000,
                                 dense=dr(data=_f32(0, 1, 0), rows=1, cols=3)), {grpc.StatusCode.OK}, ""),
        ("infer a shape of 2^62 rows", m + "ModelInfer",
         oip.ModelInferRequest(model_name="ranker", inputs=[oip.ModelInferRequest.InferInputTensor(
             name="input", datatype="FP32", shape=[2**62, 6])], raw_input_contents=[bytes(24)]), too_big, "input"),
        ("infer shape [-1, 6]", m + "ModelInfer",
         oip.ModelInferRequest(model_name="ranker", inputs=[oip.ModelInferRequest.InferInputTensor(
             name="input", datatype="FP32", shape=[-1, 6])], raw_input_contents=[bytes(24)]), invalid, "shape"),
        ("infer a shape whose product wraps around int64", m + "ModelInfer",
         oip.ModelInferRequest(model_name="ranker", inputs=[oip.ModelInferRequest.InferInputTensor(
             name="input", datatype="FP32", shape=[2**61, 2**3])], raw_input_contents=[b""]), too_big, "input"),
        ("infer FP16", m + "ModelInfer",
         oip.ModelInferRequest(model_name="ranker", inputs=[oip.ModelInferRequest.InferInputTensor(
             name="input", datatype="FP16", shape=[1, 6])], raw_input_contents=[bytes(12)]), invalid, "FP32"),
        ("infer random out of (0, 1]", m + "ModelInfer",
         oip.ModelInferRequest(model_name="linucb", inputs=[
             oip.ModelInferRequest.InferInputTensor(name="context", datatype="FP32", shape=[1, 3]),
             oip.ModelInferRequest.InferInputTensor(name="random", datatype="FP32", shape=[1, 1])],
             raw_input_contents=[_f32(0, 0, 0), _f32(float("nan"))]), invalid, "random"),
        ("metadata of version -1", m + "ModelMetadata", oip.ModelMetadataRequest(name="ranker", version="-1"),
         {grpc.StatusCode.NOT_FOUND}, "version"),
        ("results of a 100 kB experiment name", a + "GetResults",
         analysis_pb2.GetResultsRequest(experiment="e" * 100_000), {grpc.StatusCode.NOT_FOUND}, "experiment"),
        ("statistics nested 100,000 deep", a + "ComputeFromStatistics",
         analysis_pb2.ComputeFromStatisticsRequest(input_json="[" * 100_000 + "]" * 100_000), invalid, "input_json"),
        ("statistics with a 5,000-digit integer", a + "ComputeFromStatistics",
         analysis_pb2.ComputeFromStatisticsRequest(input_json=stats_with(n=123456789).replace(
             "123456789", "9" * 5000)), invalid, "input_json"),
        ("statistics with NaN", a + "ComputeFromStatistics",
         analysis_pb2.ComputeFromStatisticsRequest(input_json=stats_with(sum=float("nan"))), invalid, "sum"),
        ("statistics with 1e400", a + "ComputeFromStatistics",
         analysis_pb2.ComputeFromStatisticsRequest(input_json=stats_with(sum_sq=1).replace(
             '"sum_sq": 1}', '"sum_sq": 1e400}')), invalid, "sum_sq"),
        ("statistics with sums near the float maximum", a + "ComputeFromStatistics",
         analysis_pb2.ComputeFromStatisticsRequest(input_json=stats_with(n=10**300, sum=1e308, sum_sq=1.7e308)),
         {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}, ""),
        ("statistics with a negative count", a + "ComputeFromStatistics",
         analysis_pb2.ComputeFromStatisticsRequest(input_json=stats_with(n=-5)), invalid, "n"),
    ]


EXTREME_CASES = _extreme_cases()


@pytest.mark.parametrize("case", EXTREME_CASES, ids=[c[0] for c in EXTREME_CASES])
def test_extreme_values_get_a_clear_answer(case: tuple[str, str, object, set[grpc.StatusCode], str],
                                           fuzz_targets: dict[str, ServerProcess]) -> None:
    name, path, request, codes, text = case
    with grpc.insecure_channel(target_of(path, fuzz_targets),
                               options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        answer = raw_call(channel, path, request.SerializeToString())  # type: ignore[attr-defined]
    assert answer.code in codes, f"{name}: {answer.code} {answer.details[:300]}"
    assert text in answer.details, f"{name}: the error should name {text!r}: {answer.details[:300]}"
    assert all(s.proc.poll() is None for s in fuzz_targets.values())
