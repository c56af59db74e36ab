"""Large calls run in a bounded pool; calls nobody waits for any more are not run (issue 14, item 3)."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np

from protos.twofold.model.v1 import model_pb2, model_pb2_grpc
from tests.model.conftest import Repo, make_data, metric, scrape, start_model_server
from twofold.testing import BackgroundLoop


def dense(x: np.ndarray) -> model_pb2.DenseRows:
    x = np.ascontiguousarray(x, dtype="<f4")
    return model_pb2.DenseRows(data=x.tobytes(), rows=x.shape[0], cols=x.shape[1])


def test_queued_large_calls_past_their_deadline_are_not_run_and_the_queue_is_bounded(
        tmp_path: Path, model_repo: Repo) -> None:
    big = model_pb2.ScoreRequest(model="ranker", candidates=dense(make_data(90_000, seed=1)[0]))
    medium = model_pb2.ScoreRequest(model="ranker", candidates=dense(make_data(64, seed=2)[0]))
    with BackgroundLoop() as loop:
        server = start_model_server(loop, model_repo.root, None, poll_seconds=0, pool_threads=1)
        try:
            port = server.running.metrics_port or 0
            with grpc.insecure_channel(server.target) as channel:
                stub = model_pb2_grpc.ModelServiceStub(channel)
                stub.Score(medium, timeout=10)  # connected and warm
                before = scrape(port)
                started = time.monotonic()
                running = stub.Score.future(big, timeout=30)
                time.sleep(0.02)
                # Behind the big one in the one-thread pool: 8 may queue, the rest are refused at once.
                queued = []
                answered_in: dict[int, float] = {}
                for i in range(14):
                    sent = time.monotonic()
                    future = stub.Score.future(medium, timeout=0.05)
                    future.add_done_callback(
                        lambda _f, i=i, sent=sent: answered_in.__setitem__(i, time.monotonic() - sent))
                    queued.append(future)
                codes = [f.exception().code() if f.exception() else grpc.StatusCode.OK for f in queued]
                refused_after = time.monotonic() - started
                assert running.result().scores
                big_seconds = time.monotonic() - started
                after = scrape(port)
        finally:
            loop.run(server.running.stop(0))
    assert big_seconds > 0.1, "the large Score must outlast the small deadlines for this test to mean anything"
    # 1 running + 8 queued fill the pool: the rest are refused, unless (on a slow machine) queued calls
    # already expired and left room by the time they arrived.
    assert 1 <= codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) <= 14 - 8, codes
    assert codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) + codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 14
    ran = (metric(after, "twofold_model_requests_total", model="ranker", method="Score")
           - metric(before, "twofold_model_requests_total", model="ranker", method="Score"))
    # Only the large one ran: the queued calls' deadlines passed before their turn, so gRPC cancelled
    # them and the pool dropped them unrun (a call the pool picks up late is checked again there).
    assert ran == 1
    assert refused_after < big_seconds
    refusals = sorted(answered_in[i] for i, code in enumerate(codes) if code == grpc.StatusCode.RESOURCE_EXHAUSTED)
    print(f"\nlarge calls refused RESOURCE_EXHAUSTED in {refusals[0] * 1000:.1f}-{refusals[-1] * 1000:.1f} ms "
          f"while a {big_seconds * 1000:.0f} ms Score ran")


def test_a_decide_refused_by_the_decision_logs_back_pressure_decides_and_logs_nothing(
        tmp_path: Path, model_repo: Repo) -> None:
    """UNAVAILABLE from back-pressure comes before the policy runs: a retry cannot double-log."""
    context = dense(np.zeros((1, 3)))
    with BackgroundLoop() as loop:
        server = start_model_server(loop, model_repo.root, tmp_path / "lake", poll_seconds=0)
        try:
            decisions = server.parts.decisions
            assert decisions is not None
            # Hand over every decision at once and tolerate no lag: a Decide arriving while any
            # hand-over awaits its fsync must wait, and with 0.5 ms to wait it is refused.
            decisions.max_batch, decisions.max_lag, decisions.max_wait = 1, 0.0001, 0.0005
            before = scrape(server.running.metrics_port or 0)
            with grpc.insecure_channel(server.target) as channel:
                stub = model_pb2_grpc.ModelServiceStub(channel)
                futures = {f"d{i}": stub.Decide.future(model_pb2.DecideRequest(
                    model="linucb", unit=f"u{i}", decision_id=f"d{i}", dense=context), timeout=10) for i in range(40)}
                outcomes = {k: (f.exception().code() if f.exception() else grpc.StatusCode.OK)
                            for k, f in futures.items()}
            body = scrape(server.running.metrics_port or 0)
            server.flush_decisions()
        finally:
            loop.run(server.running.stop(0))
    from twofold.lake import read_table

    logged = set(read_table(tmp_path / "lake", "decisions").column("decision_id").to_pylist())
    answered = {k for k, code in outcomes.items() if code == grpc.StatusCode.OK}
    refused = {k for k, code in outcomes.items() if code == grpc.StatusCode.UNAVAILABLE}
    assert answered | refused == set(outcomes), outcomes
    assert refused and answered, outcomes
    assert logged == answered
    for name, labels in (("twofold_model_decision_log_refusals_total", {}),
                         ("twofold_model_failures_total", {"model": "linucb", "reason": "log_behind"})):
        assert metric(body, name, **labels) - metric(before, name, **labels) == len(refused)
