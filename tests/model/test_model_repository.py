"""The model repository: version policies, pinning, hot swaps under load, refusing broken versions."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from pathlib import Path

import grpc
import numpy as np
import pytest

from model_server.manifest import MODEL_FILE, read_manifest
from model_server.publish import publish
from model_server.repository import ModelRepository, VersionPolicy
from model_server.training import train_xgboost
from protos.twofold.model.v1 import model_pb2, model_pb2_grpc
from tests.model.conftest import (
    FEATURES,
    Repo,
    make_data,
    metric,
    publish_failing_warm_up,
    scrape,
    start_model_server,
)
from twofold.testing import BackgroundLoop


@pytest.fixture(scope="module")
def variants(model_repo: Repo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three more versions of `ranker` (different tree counts, so different outputs)."""
    root = tmp_path_factory.mktemp("variants")
    for trees in (5, 10, 20):
        train_xgboost(model_repo.x, model_repo.y, name="ranker", repository=root, feature_names=FEATURES,
                      params={"n_estimators": trees})
    return root / "ranker"


def fresh_repo(tmp_path: Path, model_repo: Repo) -> Path:
    root = tmp_path / "repo"
    (root / "ranker").mkdir(parents=True)
    source = model_repo.root / "ranker" / "1"
    publish(root, read_manifest(source), (source / MODEL_FILE).read_bytes())
    return root


def add_version(root: Path, variants: Path, index: int) -> str:
    source = variants / str(index)
    return publish(root, read_manifest(source), (source / MODEL_FILE).read_bytes()).version


def dense(x: np.ndarray) -> model_pb2.DenseRows:
    x = np.ascontiguousarray(x, dtype="<f4")
    return model_pb2.DenseRows(data=x.tobytes(), rows=x.shape[0], cols=x.shape[1])


def test_version_policy_parsing() -> None:
    assert VersionPolicy.parse("latest:3") == VersionPolicy(latest=3)
    assert VersionPolicy.parse("specific:3,1") == VersionPolicy(latest=None, specific=(1, 3))
    assert VersionPolicy.parse("all") == VersionPolicy(latest=None)
    for bad in ("latest:0", "specific:", "newest", "latest:x"):
        with pytest.raises(ValueError, match="version policy must be"):
            VersionPolicy.parse(bad)


def test_latest_n_specific_and_pinning(tmp_path: Path, model_repo: Repo, variants: Path) -> None:
    root = fresh_repo(tmp_path, model_repo)
    for i in (1, 2):
        add_version(root, variants, i)
    x, _ = make_data(3, seed=5)
    with BackgroundLoop() as loop:
        repo = ModelRepository(root, VersionPolicy.parse("latest:2"), poll_seconds=0)
        loop.run(repo.refresh())
        assert list(repo.snapshot.models["ranker"].versions) == ["3", "2"]
        assert repo.get("ranker").version == "3"
        # Pinned versions answer with their own model.
        v2 = repo.get("ranker", "2").predict(x)
        v3 = repo.get("ranker", "3").predict(x)
        assert not np.array_equal(v2, v3)
        with pytest.raises(Exception, match="no loaded version '1'"):
            repo.get("ranker", "1")
        # A model's config.yaml overrides the server default.
        (root / "ranker" / "config.yaml").write_text("version_policy: {specific: [1, 3]}\n")
        loop.run(repo.refresh())
        assert list(repo.snapshot.models["ranker"].versions) == ["3", "1"]
        (root / "ranker" / "config.yaml").write_text("version_policy: {latest: 1}\n")
        loop.run(repo.refresh())
        assert list(repo.snapshot.models["ranker"].versions) == ["3"]
        # A broken config falls back to the server default (latest:2) instead of failing.
        (root / "ranker" / "config.yaml").write_text("version_policy: {newest: 1}\n")
        loop.run(repo.refresh())
        assert list(repo.snapshot.models["ranker"].versions) == ["3", "2"]


def test_broken_versions_are_refused_while_the_previous_one_serves(tmp_path: Path, model_repo: Repo,
                                                                   variants: Path) -> None:
    root = fresh_repo(tmp_path, model_repo)
    x, _ = make_data(2, seed=6)
    with BackgroundLoop() as loop:
        server = start_model_server(loop, root, None, poll_seconds=0)
        try:
            with grpc.insecure_channel(server.target) as channel:
                stub = model_pb2_grpc.ModelServiceStub(channel)
                body_before = scrape(server.running.metrics_port or 0)
                good = stub.Predict(model_pb2.PredictRequest(model="ranker", dense=dense(x)))
                # 2: half-written (no manifest yet), 3: model bytes differ from the manifest's checksum,
                # 4: checksum right but not an ONNX graph, 5: manifest is not JSON.
                source = variants / "1"
                (root / "ranker" / "2").mkdir()
                (root / "ranker" / "2" / MODEL_FILE).write_bytes((source / MODEL_FILE).read_bytes()[:100])
                v3 = add_version(root, variants, 1)
                assert v3 == "3"
                data = bytearray((root / "ranker" / v3 / MODEL_FILE).read_bytes())
                data[len(data) // 2] ^= 0xFF
                (root / "ranker" / v3 / MODEL_FILE).write_bytes(bytes(data))
                manifest = read_manifest(source)
                publish(root, manifest, b"this is not an onnx graph", version=4)
                (root / "ranker" / "5").mkdir()
                (root / "ranker" / "5" / MODEL_FILE).write_bytes(b"x")
                (root / "ranker" / "5" / "manifest.json").write_text("{not json")
                server.loop.run(server.parts.repository.refresh())
                served = stub.Predict(model_pb2.PredictRequest(model="ranker", dense=dense(x)))
                assert served.version == "1" and list(served.outputs) == list(good.outputs)
                failures = metric(scrape(server.running.metrics_port or 0), "twofold_model_load_failures_total",
                                  model="ranker") - metric(body_before, "twofold_model_load_failures_total",
                                                           model="ranker")
                assert failures == 3  # 3, 4 and 5; the half-written 2 is simply not ready yet
                # Unchanged broken versions are not retried (no repeated failures)...
                server.loop.run(server.parts.repository.refresh())
                assert metric(scrape(server.running.metrics_port or 0), "twofold_model_load_failures_total",
                              model="ranker") - metric(body_before, "twofold_model_load_failures_total",
                                                       model="ranker") == 3
                # ...and a good newer version is picked up.
                assert add_version(root, variants, 2) == "6"
                server.loop.run(server.parts.repository.refresh())
                assert stub.Predict(model_pb2.PredictRequest(model="ranker", dense=dense(x))).version == "6"
        finally:
            loop.run(server.running.stop(0))


def test_a_version_failing_its_warm_up_is_refused_alone(tmp_path: Path, model_repo: Repo, variants: Path) -> None:
    """Loads, passes every check, fails its first run: that version is refused, nothing else is held up.

    Before: the warm-up's error escaped the scan, so no model was updated and `refresh` raised
    (at startup: the server could not start).
    """
    root = fresh_repo(tmp_path, model_repo)
    source = model_repo.root / "ranker" / "1"
    assert publish_failing_warm_up(root, source) == "2"
    other = model_repo.root / "value" / "1"
    publish(root, read_manifest(other), (other / MODEL_FILE).read_bytes())
    x, _ = make_data(2, seed=7)
    with BackgroundLoop() as loop:
        server = start_model_server(loop, root, None, poll_seconds=0)  # builds = the startup scan
        try:
            with grpc.insecure_channel(server.target) as channel:
                stub = model_pb2_grpc.ModelServiceStub(channel)
                assert stub.Predict(model_pb2.PredictRequest(model="ranker", dense=dense(x))).version == "1"
                assert stub.Predict(model_pb2.PredictRequest(model="value", dense=dense(x))).version == "1"
                body = scrape(server.running.metrics_port or 0)
                assert metric(body, "twofold_model_load_failures_total", model="ranker") >= 1
                listed = {m.name: m for m in stub.ListModels(model_pb2.ListModelsRequest()).models}
                assert [v.version for v in listed["ranker"].versions] == ["1"]
                [refused] = listed["ranker"].refused_versions
                assert refused.version == "2" and not refused.ready and "Reshape" in refused.error
                assert not listed["value"].refused_versions
                # Other models keep updating after the refusal, and so does this one.
                publish(root, read_manifest(other), (other / MODEL_FILE).read_bytes())
                assert add_version(root, variants, 1) == "3"
                server.loop.run(server.parts.repository.refresh())
                assert stub.Predict(model_pb2.PredictRequest(model="value", dense=dense(x))).version == "2"
                assert stub.Predict(model_pb2.PredictRequest(model="ranker", dense=dense(x))).version == "3"
        finally:
            loop.run(server.running.stop(0))


def test_hot_swap_under_load_fails_no_request(tmp_path: Path, model_repo: Repo, variants: Path) -> None:
    root = fresh_repo(tmp_path, model_repo)
    x, _ = make_data(1, seed=8)
    expected = {"1": None}
    with BackgroundLoop() as loop:
        server = start_model_server(loop, root, None, poll_seconds=0.05)
        try:
            old = weakref.ref(server.parts.repository.get("ranker"))
            results: list[tuple[str, float]] = []
            errors: list[BaseException] = []
            total, concurrency = 6000, 24
            done = threading.Event()

            def publisher() -> None:
                for index in (1, 2, 3):
                    time.sleep(0.4)
                    expected[add_version(root, variants, index)] = None
                done.set()

            with grpc.insecure_channel(server.target) as channel:
                stub = model_pb2_grpc.ModelServiceStub(channel)
                request = model_pb2.PredictRequest(model="ranker", dense=dense(x))
                thread = threading.Thread(target=publisher)
                thread.start()
                while len(results) + len(errors) < total or not done.is_set():
                    futures = [stub.Predict.future(request, timeout=10) for _ in range(concurrency)]
                    for future in futures:
                        try:
                            response = future.result()
                            results.append((response.version, response.outputs[0]))
                        except grpc.RpcError as exc:
                            errors.append(exc)
                thread.join()
                # Wait for the watcher to swap in the last version.
                deadline = time.monotonic() + 10
                while stub.Predict(request).version != "4" and time.monotonic() < deadline:
                    time.sleep(0.05)
            assert not errors, errors[:3]
            assert len(results) >= total
            versions = {v for v, _ in results}
            assert {"1", "4"} <= versions, versions
            # Each answer is exactly what its version computes: no call saw a half-swapped model.
            for version in versions:
                outputs = {o for v, o in results if v == version}
                assert len(outputs) == 1, (version, outputs)
            assert len({o for _, o in results}) == len(versions)
            # latest:1 serves only the newest; the first version is released once no call holds it.
            assert list(server.parts.repository.snapshot.models["ranker"].versions) == ["4"]
            gc.collect()
            assert old() is None
        finally:
            loop.run(server.running.stop(0))
