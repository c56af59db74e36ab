"""Coalescing one-row runs: exact answers, when batching starts and stops, and over real gRPC."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from model_server.coalescing import MISSES_TO_STOP, RunCoalescer
from model_server.manifest import read_manifest
from model_server.runtime import BATCH_ROWS, LoadedModel
from protos.twofold.model.v1 import model_pb2, model_pb2_grpc
from tests.model.conftest import ARMS, CONTEXT, FEATURES, Repo, metric, scrape, start_model_server
from twofold.lake import read_table
from twofold.testing import BackgroundLoop


def load(repo: Repo, name: str) -> LoadedModel:
    path = repo.root / name / "1"
    return LoadedModel(read_manifest(path), "1", path)


def rows(n: int, width: int, seed: int) -> list[np.ndarray]:
    x = np.random.default_rng(seed).normal(size=(n, width)).astype(np.float32)
    return [x[i:i + 1] for i in range(n)]


def run_rows(model: LoadedModel, method: str) -> tuple[int, float]:
    """(coalesced runs, rows in them) so far, from the version's metric child."""
    child = model.metrics.run_rows[method]
    return sum(child.counts), child.sum


async def concurrently(coalescer: RunCoalescer, model: LoadedModel, xs: list[np.ndarray],
                       ids: list[str] | None = None) -> tuple[list[object], int]:
    """Submit every row in the same loop turn, as concurrent handlers would; (results, rows held)."""
    held = 0

    async def one(i: int) -> object:
        nonlocal held
        if ids is None:
            joined = coalescer.predict(model, xs[i])
            if joined is None:
                return model.predict(xs[i])
        else:
            joined = coalescer.decide(model, xs[i], ids[i])
            if joined is None:
                return model.decide(xs[i], ids[i])
        held += 1
        return await joined

    results = await asyncio.gather(*(one(i) for i in range(len(xs))))
    return list(results), held


@pytest.mark.parametrize("name", ["ranker", "value"])
def test_coalesced_predictions_equal_single_row_runs_bit_for_bit(model_repo: Repo, name: str) -> None:
    model = load(model_repo, name)
    xs = rows(50, len(FEATURES), seed=3)
    alone = [model.predict(x) for x in xs]
    coalescer = RunCoalescer(window_seconds=0.001, max_rows=16, start_rows=2, probe_min_seconds=0)
    runs_before, rows_before = run_rows(model, "Predict")
    results, held = asyncio.run(concurrently(coalescer, model, xs))
    assert held == 50 and coalescer.batching  # the probe saw company, so batching went on
    runs, total = run_rows(model, "Predict")
    # 50 rows in runs of at most 16: four runs (16, 16, 16, then 2 when the window closed).
    assert (runs - runs_before, total - rows_before) == (4, 50)
    for got, want in zip(results, alone, strict=True):
        assert got.shape == (1, want.shape[1]) and np.array_equal(got, want)


@pytest.mark.parametrize("name", ["linucb", "thompson", "greedy"])
def test_coalesced_decisions_equal_single_row_decisions_bit_for_bit(model_repo: Repo, name: str) -> None:
    model = load(model_repo, name)
    xs = rows(40, len(CONTEXT), seed=4)
    ids = [f"decision-{i}" for i in range(40)]
    alone = [model.decide(x, d) for x, d in zip(xs, ids, strict=True)]
    coalescer = RunCoalescer(window_seconds=0.001, max_rows=BATCH_ROWS - 1, start_rows=2, probe_min_seconds=0)
    results, held = asyncio.run(concurrently(coalescer, model, xs, ids))
    assert held == 40
    for (scores, arm, propensity), (want_scores, want_arm, want_propensity) in zip(results, alone, strict=True):
        assert np.array_equal(scores, want_scores)
        assert (arm, propensity) == (want_arm, want_propensity) and isinstance(arm, int)


def test_a_sequential_caller_runs_inline_and_probes_back_off(model_repo: Repo) -> None:
    model = load(model_repo, "ranker")
    (x,) = rows(1, len(FEATURES), seed=5)
    coalescer = RunCoalescer(window_seconds=0.001, start_rows=4, probe_min_seconds=0.01, probe_max_seconds=0.08)

    async def sequential(seconds: float) -> tuple[int, int]:
        calls = held = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            joined = coalescer.predict(model, x)
            if joined is not None:
                held += 1
                assert np.array_equal(await joined, model.predict(x))
            calls += 1
            await asyncio.sleep(0.0005)  # the caller's round trip
        return calls, held

    calls, held = asyncio.run(sequential(0.6))
    assert not coalescer.batching
    # Probes every 10, 20, 40, 80, 80, ... ms: about 9 in 0.6 s, out of several hundred calls.
    assert calls > 300 and 4 <= held <= 12


def test_batching_starts_under_load_and_stops_when_company_stops(model_repo: Repo) -> None:
    model = load(model_repo, "ranker")
    xs = rows(8, len(FEATURES), seed=6)
    # The first call may probe (nothing ran before); after batching stops, none for 0.5 s.
    coalescer = RunCoalescer(window_seconds=0.002, start_rows=4, probe_min_seconds=0.5)

    async def scenario() -> None:
        _, held = await concurrently(coalescer, model, xs)
        assert held == 8 and coalescer.batching
        # Still batching: the next burst waits for its window too, even if it is small.
        _, held = await concurrently(coalescer, model, xs[:3])
        assert held == 3 and coalescer.batching
        # Alone in MISSES_TO_STOP windows in a row: batching stops, the next call runs inline.
        for _ in range(MISSES_TO_STOP):
            _, held = await concurrently(coalescer, model, xs[:1])
            assert held == 1
        assert not coalescer.batching
        _, held = await concurrently(coalescer, model, xs[:1])
        assert held == 0

    asyncio.run(scenario())


def test_a_probe_without_enough_company_does_not_start_batching(model_repo: Repo) -> None:
    model = load(model_repo, "ranker")
    coalescer = RunCoalescer(window_seconds=0.001, start_rows=4, probe_min_seconds=0.0)
    _, held = asyncio.run(concurrently(coalescer, model, rows(3, len(FEATURES), seed=7)))
    assert held == 3 and not coalescer.batching


def test_window_zero_always_runs_inline(model_repo: Repo) -> None:
    model = load(model_repo, "ranker")
    coalescer = RunCoalescer(window_seconds=0)
    _, held = asyncio.run(concurrently(coalescer, model, rows(10, len(FEATURES), seed=8)))
    assert held == 0


@pytest.mark.parametrize(("window", "max_rows"), [(-0.001, 8), (0.001, 1), (0.001, BATCH_ROWS)])
def test_refuses_settings_outside_the_exact_range(window: float, max_rows: int) -> None:
    with pytest.raises(ValueError):
        RunCoalescer(window_seconds=window, max_rows=max_rows)


def test_concurrent_grpc_decisions_are_coalesced_exact_and_logged_once(model_repo: Repo, tmp_path: Path) -> None:
    """64 Decide calls in flight at once through a real server: coalesced runs, same answers as one
    by one, and each decision in the lake."""
    with BackgroundLoop() as loop:
        # A window long enough for the whole burst to arrive on this loaded test machine.
        server = start_model_server(loop, model_repo.root, tmp_path / "lake", poll_seconds=0, coalesce_window_ms=20)
        try:
            xs = rows(64, len(CONTEXT), seed=9)

            def request(i: int) -> model_pb2.DecideRequest:
                x = np.ascontiguousarray(xs[i], dtype="<f4")
                return model_pb2.DecideRequest(model="linucb", unit=f"user-{i}", decision_id=f"g-{i}",
                                               dense=model_pb2.DenseRows(data=x.tobytes(), rows=1, cols=x.shape[1]))

            async def burst() -> list[model_pb2.DecideResponse]:
                async with grpc.aio.insecure_channel(server.target) as channel:
                    stub = model_pb2_grpc.ModelServiceStub(channel)
                    await stub.ListModels(model_pb2.ListModelsRequest())  # connected before the burst
                    return list(await asyncio.gather(*(stub.Decide(request(i)) for i in range(64))))

            answers = asyncio.run(burst())
            body = scrape(server.running.metrics_port or 0)
            coalesced_rows = metric(body, "twofold_model_coalesced_run_rows_sum", model="linucb", method="Decide")
            assert coalesced_rows >= 16  # many calls shared runs (how many depends on arrival timing)
            model = server.parts.repository.get("linucb", "")
            for i, answer in enumerate(answers):
                scores, arm, propensity = model.decide(xs[i], f"g-{i}")
                assert (answer.arm, answer.arm_index, answer.propensity) == (ARMS[arm], arm, propensity)
                assert np.array_equal(np.asarray(answer.scores, dtype=np.float32), scores)
            server.flush_decisions()
            logged = {r["decision_id"]: r for r in read_table(server.lake, "decisions").to_pylist()}
            assert {f"g-{i}" for i in range(64)} <= set(logged)
            assert all(logged[f"g-{i}"]["arm"] == answers[i].arm for i in range(64))
        finally:
            loop.run(server.running.stop(0))
