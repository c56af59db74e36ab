"""`twofold serve-model --workers 2`: one port, merged metrics, a killed worker replaced, clean SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from protos.twofold.model.v1 import model_pb2, model_pb2_grpc
from tests.model.conftest import Repo, copy_repo, metric, scrape
from twofold.lake import read_table

ROOT = Path(__file__).resolve().parents[2]


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def test_workers_share_a_port_and_survive_a_killed_worker(tmp_path: Path, model_repo: Repo) -> None:
    repo = copy_repo(model_repo, tmp_path / "repo")
    lake = tmp_path / "lake"
    ready = tmp_path / "ready.json"
    host = socket.gethostname()
    proc = subprocess.Popen(
        [sys.executable, "-m", "twofold", "serve-model", "--repository", str(repo), "--lake", str(lake),
         "--workers", "2", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--ready-file", str(ready),
         "--grace-seconds", "5"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        assert info["pid"] == proc.pid and len(set(info["workers"])) == 2
        assert set(info["workers"]) == children(proc.pid)
        target = f"127.0.0.1:{info['port']}"
        context = model_pb2.DenseRows(data=np.zeros(3, "<f4").tobytes(), rows=1, cols=3)
        ids: list[str] = []

        def decide_on_fresh_channels(count: int, tag: str) -> None:
            for i in range(count):
                # A new connection each time: the kernel spreads connections over the workers.
                with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                    stub = model_pb2_grpc.ModelServiceStub(channel)
                    response = stub.Decide(model_pb2.DecideRequest(model="greedy", unit=f"u{i}",
                                                                   decision_id=f"{tag}-{i}", dense=context),
                                           timeout=10)
                    ids.append(response.decision_id)

        decide_on_fresh_channels(40, "a")
        body = scrape(info["metrics_port"])
        assert metric(body, "twofold_model_requests_total", model="greedy", method="Decide") == 40
        assert metric(body, "twofold_bandit_decisions_total", model="greedy") == 40
        assert metric(body, "twofold_model_loaded_versions", model="ranker") == 1

        time.sleep(0.5)  # past the group-commit window: every answered decision is fsynced
        victim = info["workers"][0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            now = children(proc.pid)
            if victim not in now and len(now) == 2:
                break
            assert time.monotonic() < deadline, f"no replacement worker: {now}"
            time.sleep(0.1)
        time.sleep(1.0)
        decide_on_fresh_channels(20, "b")
        assert metric(scrape(info["metrics_port"]), "twofold_model_requests_total", model="greedy",
                      method="Decide") == 60
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
    # Every decision reached the lake exactly once, including those of the killed worker
    # (its write-ahead log was recovered by the worker that replaced it: same index, same writer id).
    decisions = read_table(lake, "decisions", dedup=False)
    assert sorted(decisions.column("decision_id").to_pylist()) == sorted(ids)
    writers = {p.name.split("-")[-3] for p in (lake / "decisions").rglob("*.parquet")}
    assert writers == {"w0", "w1"}, writers
    assert sorted(p.name for p in (lake / "_wal" / "decisions").iterdir()) == [f"{host}-w0", f"{host}-w1"]
