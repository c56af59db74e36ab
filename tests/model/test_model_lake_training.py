"""Decisions logged by a real server + events in the lake -> `twofold train bandit` -> a new version."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from model_server.bandits import PolicyConfig
from model_server.lake_training import load_decisions
from model_server.manifest import read_manifest
from model_server.training import init_bandit
from protos.twofold.model.v1 import model_pb2, model_pb2_grpc
from tests.model.conftest import ARMS, CONTEXT, start_model_server
from twofold.lake import LakeWriter, read_table
from twofold.testing import BackgroundLoop

ROOT = Path(__file__).resolve().parents[2]


def true_mean(x: np.ndarray, arm: int) -> float:
    return float(np.clip([0.5 + 0.4 * x[0], 0.5 + 0.4 * x[1], 0.55][arm], 0.02, 0.98))


def test_train_bandit_from_lake_end_to_end(tmp_path: Path) -> None:
    repo, lake = tmp_path / "repo", tmp_path / "lake"
    init_bandit(repository=repo, name="home", arms=ARMS, feature_names=CONTEXT,
                config=PolicyConfig(policy="linucb", alpha=0.2, floor=0.05))
    rng = np.random.default_rng(31)
    n = 1500
    expected_count: dict[str, int] = {}
    events = []
    with BackgroundLoop() as loop:
        server = start_model_server(loop, repo, lake, poll_seconds=0)
        try:
            with grpc.insecure_channel(server.target) as channel:
                stub = model_pb2_grpc.ModelServiceStub(channel)
                for i in range(n):
                    x = rng.normal(size=3)
                    x[2] = float(i % 2)
                    decision = stub.Decide(model_pb2.DecideRequest(
                        model="home", unit=f"u{i}", decision_id=f"dec-{i}",
                        dense=model_pb2.DenseRows(data=x.astype("<f4").tobytes(), rows=1, cols=3)))
                    now = time.time()
                    hit = rng.random() < true_mean(x, decision.arm_index)
                    expected_count[decision.decision_id] = int(hit)
                    if hit:
                        events.append({"event_id": f"e-{i}", "ts": int((now + 1) * 1e6), "unit": f"u{i}",
                                       "name": "purchase", "value": 10.0, "properties": "{}"})
                    if i % 10 == 0:
                        # Outside the window, another event name, and a retried duplicate: none may count.
                        events.append({"event_id": f"late-{i}", "ts": int((now + 1200) * 1e6), "unit": f"u{i}",
                                       "name": "purchase", "value": 1.0, "properties": "{}"})
                        events.append({"event_id": f"view-{i}", "ts": int((now + 2) * 1e6), "unit": f"u{i}",
                                       "name": "view", "value": None, "properties": "{}"})
                        if hit:
                            events.append(dict(events[-3]))
            server.flush_decisions()
        finally:
            loop.run(server.running.stop(0))

        async def write_events() -> None:
            writer = LakeWriter(root=lake, table="events")
            await writer.start()
            await writer.append(events)
            await writer.close()
        loop.run(write_events())

    logged = read_table(lake, "decisions")
    assert logged.num_rows == n
    assert sorted(logged.column("decision_id").to_pylist()) == sorted(expected_count)
    as_of = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    joined = load_decisions(lake, "home", "purchase", dt.timedelta(minutes=10), "count", as_of=as_of)
    assert dict(zip(joined.decision_ids, joined.rewards.astype(int).tolist(), strict=True)) == expected_count
    assert set(joined.arms) == set(ARMS) and (joined.propensity >= 0.05 - 1e-6).all()
    # Decisions whose window is still open are left out.
    with pytest.raises(LookupError, match="closed reward window"):
        load_decisions(lake, "home", "purchase", dt.timedelta(minutes=10), as_of=dt.datetime.now(dt.UTC))

    result = subprocess.run(
        [sys.executable, "-m", "twofold", "train", "bandit", "--lake", str(lake), "--model", "home",
         "--repository", str(repo), "--reward-event", "purchase", "--window", "10m",
         "--as-of", as_of.isoformat(), "--gate", "not-worse"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["published"] and out["version"] == "2" and out["kind"] == "bandit-linucb"
    assert (out["rows_train"], out["rows_evaluated"]) == (1200, 300)
    manifest = read_manifest(repo / "home" / "2")
    assert manifest.evaluation["gate"] == "not-worse" and manifest.evaluation["n"] == 300
    # The numbers the gate decided on: in the CLI's output and the manifest.
    decided = out["gate"]
    assert decided == manifest.evaluation["gate_decision"] and decided["publish"] and decided["rule"] == "not-worse"
    logged_value = out["evaluation"]["logged"]["value"]
    assert decided["lower_bound"] > decided["threshold"] == pytest.approx(-0.05 * abs(logged_value))
    assert decided["effective_sample_size"] >= decided["min_effective_sample_size"] == 100
    assert manifest.training["reward_event"] == "purchase" and manifest.training["alpha"] == 0.2
    assert manifest.arms == tuple(ARMS) and manifest.feature_names == tuple(CONTEXT)

    # The `better` gate refuses what it cannot show to be better, and says so (exit code 3).
    refused = subprocess.run(
        [sys.executable, "-m", "twofold", "train", "bandit", "--lake", str(lake), "--model", "home",
         "--repository", str(repo), "--reward-event", "purchase", "--window", "10m", "--as-of", as_of.isoformat(),
         "--gate", "better", "--reward", "value", "--holdout", "0.02"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 3, refused.stderr
    assert json.loads(refused.stdout)["published"] is False
    assert not (repo / "home" / "3").exists()
