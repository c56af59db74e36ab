"""End to end: `twofold demo` at a smaller size, checked from the outside.

The demo runs as a user would start it (a subprocess). The test then reads what it left
behind with its own code: the lake's Parquet (exposures, events, decisions), the results
document, and a ground truth recomputed here with ONNX Runtime directly from the published
model files, independently of the demo's and the model server's code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow.compute as pc
import pytest

from tests.s3_server import S3Server
from twofold.demo import world
from twofold.lake import read_table
from twofold.lakestore import open_store

ROOT = Path(__file__).absolute().parent.parent
USERS = 3000


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of the (finished) demo counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _server_pids(logs: Path) -> list[int]:
    return [json.loads(p.read_text())["pid"] for p in logs.glob("*.ready.json")]


def _latest(repository: Path, model: str) -> Path:
    return max((repository / model).iterdir(), key=lambda p: int(p.name)) / "model.onnx"


def _true_rates(repository: Path) -> dict[str, float]:
    """Population conversion per system, straight from the ONNX files (not via the demo's code)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    ranker = ort.InferenceSession(str(_latest(repository, "home-ranker")), options)
    bandit = ort.InferenceSession(str(_latest(repository, "home-linucb")), options)
    x = world.sample_users(100_000, np.random.default_rng(2024))
    p = world.conversion_probability(x)
    k = len(world.THEMES)
    scores = []
    for theme in range(k):
        rows = np.hstack([x, np.tile(np.eye(k, dtype=np.float32)[theme], (len(x), 1))])
        outputs = dict(zip([o.name for o in ranker.get_outputs()],
                           ranker.run(None, {ranker.get_inputs()[0].name: rows}), strict=True))
        scores.append(outputs["probabilities"][:, 1])
    ranked = np.argmax(np.column_stack(scores), axis=1)
    random_width = bandit.get_inputs()[1].shape[1]
    probabilities = bandit.run(["probabilities"], {"context": x, "random": np.full((len(x), random_width), 0.5,
                                                                                   np.float32)})[0]
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5) and probabilities.min() > 0
    return {"static": float(p[:, 0].mean()), "ranker": float(p[np.arange(len(x)), ranked].mean()),
            "bandit": float((probabilities * p).sum(axis=1).mean())}


@pytest.mark.timeout(240)
def test_demo_end_to_end(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "twofold", "demo", "--dir", str(folder), "--users", str(USERS),
         "--train-rows", "8000", "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=200)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "RECOVERED" in result.stdout

    # Every server the demo started is gone.
    pids = _server_pids(folder / "logs")
    assert len(pids) == 3 and not any(_alive(pid) for pid in pids)

    lake = folder / "lake"
    exposures = read_table(lake, "exposures")
    assert exposures.num_rows == USERS  # one exposure per unit: deduplicated, nothing lost
    assert len(set(exposures.column("unit").to_pylist())) == USERS
    variants = {v.rsplit("/", 1)[-1] for v in exposures.column("variant").to_pylist()}
    assert variants == {"static", "ranker", "bandit"}
    events = read_table(lake, "events")
    purchases = events.filter(pc.equal(events.column("name"), "purchase"))
    assert purchases.num_rows > 100 and pc.min(purchases.column("value")).as_py() >= 20.0
    assert set(events.column("unit").to_pylist()) <= set(exposures.column("unit").to_pylist())
    # Outcomes happen after the visit, and the lake's (skew-corrected) timestamps say so.
    first_exposure = dict(zip(exposures.column("unit").to_pylist(), exposures.column("ts").to_pylist(), strict=True))
    assert all(ts >= first_exposure[unit] for unit, ts in zip(events.column("unit").to_pylist(),
                                                               events.column("ts").to_pylist(), strict=True))

    # The bandit's decisions are logged with their propensities, one per bandit unit.
    bandit_units = {u for u, v in zip(exposures.column("unit").to_pylist(), exposures.column("variant").to_pylist(),
                                      strict=True) if v.endswith("bandit")}
    decisions = read_table(lake, "decisions")
    assert set(decisions.column("unit").to_pylist()) == bandit_units
    propensities = np.array(decisions.column("propensity").to_pylist())
    assert decisions.num_rows == len(bandit_units) and ((propensities > 0) & (propensities <= 1)).all()
    assert (propensities >= 0.02 - 1e-6).all()  # the policy's exploration floor

    document = json.loads((folder / "results" / "home-ranking.json").read_text())
    assert not document["srm"]["mismatch"] and document["srm"]["p_value"] > 0.001
    assert sum(document["units"].values()) == USERS
    truth = _true_rates(folder / "repository")
    conversion = next(m for m in document["metrics"] if m["metric"] == "conversion")
    for arm in ("ranker", "bandit"):
        comparison = next(c for c in conversion["comparisons"] if c["variant"] == arm)
        true_lift = truth[arm] - truth["static"]
        assert comparison["ci_lower"] <= true_lift <= comparison["ci_upper"], (arm, true_lift, comparison)
        assert comparison["significant"] and comparison["diff"] > 0
    assert (folder / "results" / "home-ranking.html").read_text().lstrip().lower().startswith("<!doctype html")


@pytest.mark.timeout(150)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP, signal.SIGTERM], ids=lambda s: s.name)
def test_interrupt_or_hangup_stops_every_server_and_removes_the_temp_folder(signum: signal.Signals) -> None:
    """Ctrl-C, SIGTERM and SIGHUP (the terminal closed) stop every server the demo started and
    remove its --temp folder; the demo says "stopping..." as soon as the signal arrives."""
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "twofold", "demo", "--temp", "--users", "200000",
         "--train-rows", "3000", "--no-progress"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), line) for line in proc.stdout or ()))
    reader.start()
    try:
        deadline = time.monotonic() + 90
        while not lines:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        folder = Path(lines[0][1].split(" in ", 1)[1].strip())
        while len(_server_pids(folder / "logs")) < 3:
            assert proc.poll() is None, "".join(line for _, line in lines)
            assert time.monotonic() < deadline
            time.sleep(0.2)
        pids = _server_pids(folder / "logs")
        assert all(_alive(pid) for pid in pids)
        time.sleep(1.0)  # into the simulation
        sent = time.monotonic()
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == 130
        reader.join(timeout=10)
        said = [(t, line) for t, line in lines if "stopping..." in line]
        assert said and said[0][0] - sent < 3.0, lines[-5:]
        assert not any(_alive(pid) for pid in pids)
        assert not folder.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_demo_on_an_s3_lake(tmp_path: Path, s3_env: S3Server) -> None:
    """`twofold demo --lake s3://bucket/prefix` against the test S3 server: the servers publish to
    the bucket, the analysis reads it, the effects are recovered; a prefix holding data the demo
    did not write is refused, one it wrote before is cleared and reused."""
    bucket = s3_env.new_bucket()
    foreign = f"s3://{bucket}/other"
    open_store(foreign).publish("events/date=2026-01-01/theirs.parquet", b"not ours")
    refused = subprocess.run([sys.executable, "-m", "twofold", "demo", "--dir", str(tmp_path / "refused"),
                              "--lake", foreign, "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2 and "did not write" in refused.stderr
    assert open_store(foreign).exists("events/date=2026-01-01/theirs.parquet")

    lake = f"s3://{bucket}/demo"
    for attempt in range(2):  # the second run clears the first run's lake
        folder = tmp_path / f"demo{attempt}"
        result = subprocess.run(
            [sys.executable, "-m", "twofold", "demo", "--dir", str(folder), "--users", str(USERS),
             "--train-rows", "8000", "--no-progress", "--lake", lake],
            cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        assert "RECOVERED" in result.stdout
        exposures = read_table(lake, "exposures", dedup=False)
        assert exposures.num_rows == USERS == len(set(exposures.column("unit").to_pylist()))
        assert not list(folder.rglob("*.parquet"))  # nothing published locally: the lake is the bucket
        document = json.loads((folder / "results" / "home-ranking.json").read_text())
        assert sum(document["units"].values()) == USERS
