"""Labelled failure counters exist at 0 before the first failure, so `increase()` sees it.

A labelled Prometheus counter has no series until its first increment; a series born at 1
gives `increase()` nothing to compare, and an alert on the first failure never fires. Real
servers are scraped on their /metrics port: each failure counter's series is there at 0 once
its label set is known (a lake table opened, a model found, an experiment loaded), and a
model version that fails to load moves it 0 -> 1.
"""

from __future__ import annotations

import base64
import os
import shutil
import time
import urllib.request
from pathlib import Path

from twofold.demo.processes import ROOT, ServerGroup, ServerProcess


def series(server: ServerProcess, name: str) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    out = {}
    for line in body.splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            out[labels[len(name):]] = float(value)
    return out


def test_failure_counters_start_at_zero_and_go_to_one(tmp_path: Path) -> None:
    from model_server.training import init_bandit

    repository = tmp_path / "models"
    init_bandit(repository=repository, name="home-linucb", arms=["a", "b"], feature_names=["x"])
    key = tmp_path / "token.key"
    key.write_text(base64.b64encode(os.urandom(32)).decode())
    lake = tmp_path / "lake"
    with ServerGroup(tmp_path / "run") as group:
        assignment = group.start("assignment", ["serve-assignment", "--flags", str(ROOT / "examples" / "flags"),
                                                "--lake", str(lake), "--token-key-file", str(key)])
        model = group.start("model", ["serve-model", "--repository", str(repository), "--lake", str(lake),
                                      "--poll-seconds", "0.2"])
        analysis = group.start("analysis", ["serve-analysis", "--experiments", str(ROOT / "examples" / "experiments"),
                                            "--lake", str(lake), "--every", "1h"])
        assert series(assignment, "twofold_lake_write_failures_total") == {
            '{table="exposures"}': 0.0, '{table="events"}': 0.0}
        assert series(model, "twofold_model_load_failures_total") == {'{model="home-linucb"}': 0.0}
        assert series(model, "twofold_lake_write_failures_total") == {'{table="decisions"}': 0.0}
        assert series(analysis, "twofold_analysis_failures_total") == {'{experiment="home-ranking"}': 0.0}
        # A broken newer version of the model: the series goes 0 -> 1, which increase() sees.
        broken = repository / "home-linucb" / "2"
        shutil.copytree(repository / "home-linucb" / "1", broken)
        (broken / "model.onnx").write_bytes(b"not an onnx graph")
        deadline = time.monotonic() + 30
        while series(model, "twofold_model_load_failures_total") != {'{model="home-linucb"}': 1.0}:
            assert time.monotonic() < deadline, model.log_tail()
            time.sleep(0.2)
