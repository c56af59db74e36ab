"""The analysis service over real gRPC on loopback, its scheduler and metrics, and `serve-analysis` as a process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from analysis_worker.compute import compute_results
from analysis_worker.inputs import parse_input
from analysis_worker.service import AnalysisWorker, registration
from analysis_worker.synthetic import write_synthetic_lake
from protos.twofold.analysis.v1 import analysis_pb2, analysis_pb2_grpc
from twofold.server import RunningServer, start_server
from twofold.settings import ServerSettings
from twofold.testing import BackgroundLoop

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "tests" / "data" / "home-ranking-analysis.yaml"  # a fixed experiment of these tests


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("service-lake")
    write_synthetic_lake(root, exposures=20_000, events=60_000, seed=3, chunk=30_000)
    return root


@pytest.fixture
def experiments(tmp_path: Path) -> Path:
    """Two good definitions, one naming a flag nobody was exposed to, one that does not parse."""
    folder = tmp_path / "experiments"
    folder.mkdir()
    base = yaml.safe_load(EXAMPLE.read_text())
    (folder / "a.yaml").write_text(yaml.safe_dump(base))
    (folder / "b.yaml").write_text(yaml.safe_dump({**base, "name": "fixed-horizon", "sequential": None,
                                                   "correction": "bonferroni"}))
    (folder / "c.yaml").write_text(yaml.safe_dump({**base, "name": "ghost-flag", "flag": "ghost"}))
    (folder / "d.yaml").write_text("name: broken\nmetrics: [\n")
    return folder


@pytest.fixture
def served(bg_loop: BackgroundLoop, lake: Path, experiments: Path, tmp_path: Path
           ) -> Iterator[tuple[AnalysisWorker, RunningServer, analysis_pb2_grpc.AnalysisServiceStub]]:
    worker = AnalysisWorker([experiments], lake, every_seconds=3600, out_dir=tmp_path / "out")
    running = bg_loop.run(start_server(ServerSettings(port=0, metrics_port=0), [registration(worker)]))
    bg_loop.run(worker.run_round(), timeout=120)
    channel = grpc.insecure_channel(running.target)
    try:
        yield worker, running, analysis_pb2_grpc.AnalysisServiceStub(channel)
    finally:
        channel.close()
        bg_loop.run(running.stop(0))


def _metric(port: int | None, name: str, experiment: str) -> float | None:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in body.splitlines():
        if line.startswith(f'{name}{{experiment="{experiment}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_list_and_get_results(served: Any) -> None:
    worker, _, stub = served
    listed = {e.name: e for e in stub.ListExperiments(analysis_pb2.ListExperimentsRequest()).experiments}
    assert set(listed) == {"home-ranking-bandit", "fixed-horizon", "ghost-flag"}
    good = listed["home-ranking-bandit"]
    assert good.flag == "home-ranking" and good.error == ""
    assert good.recommendation in ("ship", "no-ship", "keep-running")
    assert good.computed_at.seconds > 0
    # The experiment with no exposures still gets a document that says why; the others are computed.
    assert "no exposures of flag 'ghost'" in listed["ghost-flag"].error
    assert any("broken" in str(k) or "d.yaml" in k for k in worker.load_errors)
    reply = stub.GetResults(analysis_pb2.GetResultsRequest(experiment="home-ranking-bandit"))
    doc = json.loads(reply.results_json)
    assert doc["experiment"] == "home-ranking-bandit" and len(doc["metrics"]) == 5
    assert reply.computed_at.seconds == good.computed_at.seconds
    assert reply.report_html == ""
    with_html = stub.GetResults(analysis_pb2.GetResultsRequest(experiment="home-ranking-bandit", include_html=True))
    assert with_html.report_html.startswith("<!doctype html>") and "<svg" in with_html.report_html
    ghost = json.loads(stub.GetResults(analysis_pb2.GetResultsRequest(experiment="ghost-flag")).results_json)
    assert "no exposures" in ghost["error"]
    # Results files are written for the computed experiments.
    assert (Path(worker.out_dir) / "fixed-horizon.json").exists()
    assert (Path(worker.out_dir) / "home-ranking-bandit.html").exists()


def test_get_results_errors_have_the_right_status(served: Any) -> None:
    _, _, stub = served
    with pytest.raises(grpc.RpcError) as err:
        stub.GetResults(analysis_pb2.GetResultsRequest(experiment="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "home-ranking-bandit" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.GetResults(analysis_pb2.GetResultsRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_compute_from_statistics(served: Any) -> None:
    _, _, stub = served
    raw = {"alpha": 0.05, "power": 0.8, "correction": "holm", "control": "control",
           "expected_split": {"control": 0.5, "treatment": 0.5}, "sequential": None,
           "metrics": [{"name": "revenue", "kind": "mean", "role": "success", "direction": "increase",
                        "variants": {"control": {"n": 10000, "sum": 52000.0, "sum_sq": 350000.0},
                                     "treatment": {"n": 10050, "sum": 54000.0, "sum_sq": 360000.0}}}]}
    reply = stub.ComputeFromStatistics(analysis_pb2.ComputeFromStatisticsRequest(input_json=json.dumps(raw)))
    doc = json.loads(reply.results_json)
    expected = compute_results(parse_input(raw))
    assert doc["metrics"] == expected["metrics"] and doc["srm"] == expected["srm"]
    for bad, message in (("{nope", "not valid JSON"), (json.dumps({**raw, "alpha": 2}), "alpha"),
                         (json.dumps({**raw, "metrics": [{"name": "x"}]}), "variants")):
        with pytest.raises(grpc.RpcError) as err:
            stub.ComputeFromStatistics(analysis_pb2.ComputeFromStatisticsRequest(input_json=bad))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.value.details()


def test_metrics_for_sres(served: Any) -> None:
    _, running, _ = served
    port = running.metrics_port
    assert (_metric(port, "twofold_analysis_last_success_timestamp_seconds", "home-ranking-bandit") or 0) > \
        time.time() - 600
    assert (_metric(port, "twofold_analysis_rows_scanned", "home-ranking-bandit") or 0) > 80_000
    assert _metric(port, "twofold_analysis_duration_seconds", "home-ranking-bandit") is not None
    assert _metric(port, "twofold_analysis_srm_mismatch", "home-ranking-bandit") == 0.0
    assert (_metric(port, "twofold_analysis_failures_total", "ghost-flag") or 0) >= 1


def test_a_broken_definition_keeps_the_last_good_one(served: Any, bg_loop: BackgroundLoop, experiments: Path) -> None:
    worker, _, stub = served
    before = stub.GetResults(analysis_pb2.GetResultsRequest(experiment="fixed-horizon")).results_json
    (experiments / "b.yaml").write_text("name: fixed-horizon\nflag: [\n")
    bg_loop.run(worker.run_round(), timeout=120)
    listed = {e.name: e for e in stub.ListExperiments(analysis_pb2.ListExperimentsRequest()).experiments}
    assert "keeping the last good one" in listed["fixed-horizon"].error
    after = json.loads(stub.GetResults(analysis_pb2.GetResultsRequest(experiment="fixed-horizon")).results_json)
    assert after["experiment"] == "fixed-horizon" and after["correction"] == "bonferroni"
    assert json.loads(before)["metrics"][0]["metric"] == after["metrics"][0]["metric"]


def test_serve_analysis_process(lake: Path, tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "twofold", "serve-analysis", "--experiments", str(EXAMPLE), "--lake", str(lake),
         "--every", "1h", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--grace-seconds", "1",
         "--ready-file", str(ready), "--log-format", "text"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.1)
        port = json.loads(ready.read_text())["port"]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = analysis_pb2_grpc.AnalysisServiceStub(channel)
            doc = None
            while doc is None:
                try:
                    doc = json.loads(stub.GetResults(
                        analysis_pb2.GetResultsRequest(experiment="home-ranking-bandit"), timeout=5).results_json)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE  # not computed yet
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
            assert doc["experiment"] == "home-ranking-bandit"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def test_published_looks_survive_a_restart_of_the_worker(bg_loop: BackgroundLoop, lake: Path, tmp_path: Path) -> None:
    """Every recompute of a sequential experiment is a look, recorded beside the results; a new
    worker on the same folder carries on counting (the log and the document list every look)."""
    folder = tmp_path / "experiments"
    folder.mkdir()
    base = yaml.safe_load(EXAMPLE.read_text())
    base["sequential"]["expected_units"] = 10_000_000
    (folder / "seq.yaml").write_text(yaml.safe_dump(base))
    out = tmp_path / "out"

    def round_of_a_new_worker() -> dict[str, Any]:
        worker = AnalysisWorker([folder], lake, every_seconds=3600, out_dir=out)
        bg_loop.run(worker.run_round(), timeout=120)
        state = worker.experiments[base["name"]]
        assert state.error == "" and state.analysis is not None
        return state.analysis.document

    first = round_of_a_new_worker()
    assert first["sequential"]["status"] == "open" and len(first["sequential"]["looks_taken"]) == 1
    second = round_of_a_new_worker()
    looks = second["sequential"]["looks_taken"]
    assert [look["units"] for look in looks] == [sum(first["units"].values())] * 2
    assert looks[0] == first["sequential"]["looks_taken"][0]
    stored = json.loads((out / f"{base['name']}.looks.json").read_text())
    assert stored["looks"] == looks
    assert json.loads((out / f"{base['name']}.json").read_text())["sequential"]["looks_taken"] == looks
    # A log that cannot be read publishes nothing (a verdict without its looks could break the guarantee).
    (out / f"{base['name']}.looks.json").write_text("{not json")
    worker = AnalysisWorker([folder], lake, every_seconds=3600, out_dir=out)
    bg_loop.run(worker.run_round(), timeout=120)
    state = worker.experiments[base["name"]]
    assert state.analysis is None and state.error.startswith("recording the sequential look failed")
