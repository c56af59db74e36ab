"""Fixtures for the model server tests: trained models in a repository and a running server."""

from __future__ import annotations

import shutil
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from model_server.app import ModelServerConfig, ModelServerParts, build
from model_server.bandits import PolicyConfig, fit_linear_arms, publish_policy
from model_server.manifest import Manifest, read_manifest
from model_server.publish import publish
from model_server.training import train_xgboost
from twofold.server import RunningServer, start_server
from twofold.settings import ServerSettings
from twofold.testing import BackgroundLoop

FEATURES = ["age", "tenure", "clicks", "price", "hour", "score"]
ARMS = ["hero", "grid", "list"]
CONTEXT = ["recency", "frequency", "mobile"]


def make_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A classification problem with interactions, so trees are non-trivial."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(FEATURES))).astype(np.float32)
    logits = 1.5 * x[:, 0] - x[:, 1] * x[:, 2] + 0.5 * np.sin(3 * x[:, 3])
    y = (logits + rng.logistic(size=n) * 0.3 > 0).astype(np.int64)
    return x, y


def bandit_log(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Uniformly logged decisions where the best arm depends on the context."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(CONTEXT)))
    arms = rng.integers(0, len(ARMS), n)
    mean = np.where(arms == 0, 0.5 + 0.4 * x[:, 0], np.where(arms == 1, 0.5 + 0.4 * x[:, 1], 0.55))
    rewards = (rng.random(n) < np.clip(mean, 0.01, 0.99)).astype(np.float64)
    return x, arms, rewards


@dataclass
class Repo:
    root: Path
    x: np.ndarray
    y: np.ndarray


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    """A repository with a classifier, a regressor and the three bandit policies (built once)."""
    root = tmp_path_factory.mktemp("repo")
    x, y = make_data(2000)
    train_xgboost(x, y, name="ranker", repository=root, feature_names=FEATURES, params={"n_estimators": 60})
    train_xgboost(x, x[:, 0] * 2 + x[:, 1] - x[:, 2] * x[:, 3], name="value", repository=root,
                  feature_names=FEATURES, task="regressor", params={"n_estimators": 40})
    bx, barms, brew = bandit_log(3000)
    stats = fit_linear_arms(bx, barms, brew, len(ARMS))
    for policy, name in (("linucb", "linucb"), ("thompson", "thompson"), ("epsilon-greedy", "greedy")):
        publish_policy(repository=root, name=name, arms=ARMS, feature_names=CONTEXT, stats=stats,
                       config=PolicyConfig(policy=policy, floor=0.02, draws=32))
    return Repo(root, x, y)


def copy_repo(repo: Repo, target: Path) -> Path:
    shutil.copytree(repo.root, target)
    return target


@pytest.fixture(scope="module")
def loop() -> Iterator[BackgroundLoop]:
    background = BackgroundLoop()
    try:
        yield background
    finally:
        background.close()


@dataclass
class Server:
    running: RunningServer
    parts: ModelServerParts
    lake: Path
    loop: BackgroundLoop

    def flush_decisions(self) -> None:
        """Hand queued decisions to the lake writer and compact them into Parquet now."""
        decisions = self.parts.decisions
        assert decisions is not None

        async def go() -> None:
            await decisions.drain()
            await decisions.writer.flush()
        self.loop.run(go())

    @property
    def target(self) -> str:
        return self.running.target


def start_model_server(loop: BackgroundLoop, repository: Path, lake: Path | None, **config: object) -> Server:
    async def go() -> Server:
        parts = await build(ModelServerConfig(repository=str(repository), lake=str(lake) if lake else None,
                                              lake_compact_interval_s=0.2, **config))  # type: ignore[arg-type]
        running = await start_server(ServerSettings(port=0, metrics_port=0), parts.setup.services)
        assert parts.setup.on_stop is not None and parts.setup.on_started is not None
        running.on_stop(parts.setup.on_stop)
        await parts.setup.on_started(running)
        return Server(running, parts, lake or Path("/nonexistent"), loop)
    return loop.run(go())


@pytest.fixture(scope="module")
def server(loop: BackgroundLoop, model_repo: Repo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    lake = tmp_path_factory.mktemp("lake")
    # Two batch threads: Score (100 candidates) then runs on the multi-threaded batch session.
    running = start_model_server(loop, model_repo.root, lake, poll_seconds=0, batch_threads=2)
    try:
        yield running
    finally:
        loop.run(running.running.stop(0))


def scrape(metrics_port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()


def metric(body: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in body.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        series, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


def failing_warm_up_graph(manifest: Manifest) -> bytes:
    """A classifier graph with the manifest's inputs and outputs that ONNX Runtime loads but cannot run.

    It reshapes the input to a fixed 3 rows, which only fails when run with another row count,
    as the server's one-row warm-up does: loading, the checksum and the graph-vs-manifest checks
    all pass, exactly the version the issue saw stop every later update.
    """
    from onnx import TensorProto, helper

    width = len(manifest.feature_names)
    nodes = [
        helper.make_node("Reshape", ["input", "three_rows"], ["reshaped"]),
        helper.make_node("Identity", ["reshaped"], ["probabilities"]),
        helper.make_node("ArgMax", ["reshaped"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "fails-on-warm-up",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, None])],
        initializer=[helper.make_tensor("three_rows", TensorProto.INT64, [2], [3, width])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def publish_failing_warm_up(root: Path, source: Path) -> str:
    """Publish (atomically, as trainers do) a version of `source`'s model whose warm-up run fails."""
    manifest = read_manifest(source)
    return publish(root, manifest, failing_warm_up_graph(manifest)).version
