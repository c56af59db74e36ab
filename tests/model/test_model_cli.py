"""The command line: refusals with exit code 2, `train bandit --init`, and durable decisions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np

from model_server.manifest import read_manifest
from protos.twofold.model.v1 import model_pb2, model_pb2_grpc
from tests.model.conftest import start_model_server
from twofold.lake import read_table
from twofold.testing import BackgroundLoop

ROOT = Path(__file__).resolve().parents[2]


def twofold(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "twofold", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_serve_model_refuses_bad_arguments(tmp_path: Path) -> None:
    missing = twofold("serve-model", "--port", "0")
    assert missing.returncode == 2 and "--repository is required" in missing.stderr
    result = twofold("serve-model", "--repository", str(tmp_path / "nope"), "--workers", "0",
                     "--version-policy", "newest", "--batch-threads", "-1", "--coalesce-window-ms", "-1",
                     "--coalesce-max-rows", "64")
    assert result.returncode == 2
    assert "is not a folder" in result.stderr and "--workers must be at least 1" in result.stderr
    assert "version policy must be" in result.stderr
    assert "--batch-threads must be 0 (automatic) or more" in result.stderr
    assert "--coalesce-window-ms must be between 0 (off) and 100" in result.stderr
    assert "--coalesce-max-rows must be between 2 and 63" in result.stderr


def test_batch_threads_default_leaves_a_core_per_worker() -> None:
    import argparse
    import os

    from model_server.cli import batch_threads

    cores = os.cpu_count() or 1
    assert batch_threads(argparse.Namespace(batch_threads=3, workers=8)) == 3
    assert batch_threads(argparse.Namespace(batch_threads=0, workers=1)) == (2 if cores >= 2 else 1)
    assert batch_threads(argparse.Namespace(batch_threads=0, workers=cores)) == 1  # a worker per core: no spare


def test_train_bandit_init_and_durable_decisions(tmp_path: Path) -> None:
    repo, lake = tmp_path / "repo", tmp_path / "lake"
    out = twofold("train", "bandit", "--init", "--model", "layout", "--repository", str(repo),
                  "--arms", "a,b,c,d", "--features", "x,y", "--policy", "thompson", "--floor", "0.05",
                  "--draws", "16")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["version"] == "1"
    manifest = read_manifest(repo / "layout" / "1")
    assert manifest.kind == "bandit-thompson" and manifest.arms == ("a", "b", "c", "d")
    assert manifest.training["floor"] == 0.05 and manifest.random_width == 1 + 2 * 16 * 4
    bad = twofold("train", "bandit", "--init", "--model", "x", "--repository", str(repo), "--arms", "a,b",
                  "--features", "x", "--floor", "0.9")
    assert bad.returncode == 2 and "floor must be within" in bad.stderr
    no_reward = twofold("train", "bandit", "--model", "layout", "--repository", str(repo), "--lake", str(lake))
    assert no_reward.returncode == 2 and "--reward-event is required" in no_reward.stderr

    with BackgroundLoop() as loop:
        server = start_model_server(loop, repo, lake, poll_seconds=0, durable_decisions=True)
        try:
            with grpc.insecure_channel(server.target) as channel:
                stub = model_pb2_grpc.ModelServiceStub(channel)
                answers = [stub.Decide(model_pb2.DecideRequest(
                    model="layout", unit=f"u{i}", decision_id=f"d{i}", dense=model_pb2.DenseRows(
                        data=np.array([i, -i], "<f4").tobytes(), rows=1, cols=2))) for i in range(20)]
            # Durable mode: acknowledged means already in the write-ahead log, no drain needed.
            assert server.parts.decisions is not None
            loop.run(server.parts.decisions.writer.flush())
            logged = {r["decision_id"]: r for r in read_table(lake, "decisions").to_pylist()}
            assert set(logged) == {a.decision_id for a in answers}
            # An untrained policy explores: every arm shows up. Thompson's propensity is the floor
            # plus the arm's share of the 16 posterior draws it won.
            assert {a.arm for a in answers} == {"a", "b", "c", "d"}
            wins = [(a.propensity - 0.05) / (0.8 / 16) for a in answers]
            assert all(abs(w - round(w)) < 1e-4 and 0 <= round(w) <= 16 for w in wins), wins
        finally:
            loop.run(server.running.stop(0))
