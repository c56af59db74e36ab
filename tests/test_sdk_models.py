"""`decide()` calling the systems arms name, against real assignment and model servers.

The model server serves the demo's XGBoost ranker and LinUCB policy (trained here with the
model server's Python API); answers are checked against the same ONNX graphs run locally,
the decision log against the lake, and failure behaviour by stopping the model server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from client_sdk import AsyncClient, Client, ClientOptions, Deadlines, ErrorCode, Reason
from tests.test_sdk_client import SECRET, start_assignment, write_flags
from twofold.demo import world
from twofold.demo.processes import ServerGroup, ServerProcess
from twofold.demo.train import BANDIT, RANKER, TrainedSystems, train_systems
from twofold.lake import read_table

FLAGS = """\
flag: rank-all
variants:
  ranker: {system: model, model: home-ranker, top_k: 2, fallback: {theme: editorial}}
rules:
  - name: everyone
    serve: ranker
---
flag: ctr
variants:
  ranker: {system: model, model: home-ranker}
rules:
  - name: everyone
    serve: ranker
---
flag: bandit-all
variants:
  bandit: {system: bandit, model: home-linucb}
rules:
  - name: everyone
    serve: bandit
---
flag: plain
variants:
  static: {system: static, theme: music}
rules:
  - name: everyone
    serve: static
---
client: backend
secrets:
  - secret: test-secret
"""


@dataclass
class Stack:
    group: ServerGroup
    assignment: ServerProcess
    model: ServerProcess
    trained: TrainedSystems
    base: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedSystems:
    return train_systems(tmp_path_factory.mktemp("models") / "repository", rows=6000)


def _start_model(group: ServerGroup, repository: Path, lake: Path, name: str = "model", port: int = 0) -> ServerProcess:
    return group.start(name, ["serve-model", "--repository", str(repository), "--lake", str(lake),
                              "--log-format", "text"], port=port)


@pytest.fixture
def stack(tmp_path: Path, trained: TrainedSystems) -> Iterator[Stack]:
    write_flags(tmp_path / "flags", FLAGS)
    with ServerGroup(tmp_path / "run") as group:
        assignment = start_assignment(group, tmp_path)
        model = _start_model(group, trained.ranker.path.parents[1], tmp_path / "lake")
        yield Stack(group, assignment, model, trained, tmp_path)


def _local(published: object) -> object:
    from model_server.runtime import LoadedModel

    return LoadedModel(published.manifest, published.version, published.path)  # type: ignore[attr-defined]


def _opts(**kw: object) -> ClientOptions:
    return ClientOptions(flush_at_exit=False, **kw)  # type: ignore[arg-type]


def test_ranker_arm_scores_candidates_in_one_call(stack: Stack) -> None:
    users = world.sample_users(20, np.random.default_rng(1))
    ranker = _local(stack.trained.ranker)
    with Client(stack.assignment.target, stack.model.target, SECRET, options=_opts()) as client:
        for i, x in enumerate(users):
            d = client.decide("rank-all", f"u{i}", features=x, candidates=world.candidates())
            expected = ranker.score(world.ranker_rows(np.repeat(x[None, :], 4, 0), np.arange(4)))  # type: ignore[attr-defined]
            assert (d.system, d.reason, d.model, d.model_version) == ("model", Reason.MATCH, RANKER, "1")
            assert d.value == list(np.argsort(-expected, kind="stable")[:2])
            assert d.scores == pytest.approx(expected.tolist(), abs=1e-6)
        # Without candidates, the feature row is scored with Predict.
        row = world.ranker_rows(users[:1], np.array([3]))[0]
        p = client.decide("ctr", "u1", features=row)
        assert p.system == "model" and p.reason is Reason.MATCH
        assert np.asarray(p.value).ravel()[-1] == pytest.approx(float(ranker.score(row[None, :])[0]), abs=1e-6)  # type: ignore[attr-defined]


def test_bandit_arm_decisions_replay_and_are_logged_with_propensities(stack: Stack) -> None:
    users = world.sample_users(40, np.random.default_rng(2))
    policy = _local(stack.trained.bandit)
    with Client(stack.assignment.target, stack.model.target, SECRET, options=_opts()) as client:
        decisions = [client.decide("bandit-all", f"u{i}", features=x) for i, x in enumerate(users)]
    for x, d in zip(users, decisions, strict=True):
        assert (d.system, d.reason, d.model, d.model_version) == ("bandit", Reason.MATCH, BANDIT, "1")
        _, arm, propensity = policy.decide(x[None, :], d.decision_id)  # type: ignore[attr-defined]
        assert d.arm == world.THEMES[arm] == d.value and d.arm_index == arm
        assert d.propensity == pytest.approx(propensity, rel=1e-6) and 0.0 < d.propensity <= 1.0
    stack.group.stop("model")
    logged = read_table(stack.base / "lake", "decisions").to_pylist()
    by_id = {row["decision_id"]: row for row in logged}
    assert set(by_id) == {d.decision_id for d in decisions}
    for x, d in zip(users, decisions, strict=True):
        row = by_id[d.decision_id]
        assert (row["unit"], row["arm"], row["model"], row["model_version"]) == (d.unit, d.arm, BANDIT, "1")
        assert row["propensity"] == pytest.approx(d.propensity, rel=1e-6)
        assert row["features"] == pytest.approx(x.tolist())


def test_model_server_down_serves_the_fallback_and_says_why(stack: Stack) -> None:
    x = world.sample_users(1, np.random.default_rng(3))[0]
    deadline = 0.25
    options = _opts(deadlines=Deadlines(model=deadline), flush_interval=0.2)
    with Client(stack.assignment.target, stack.model.target, SECRET, options=options) as client:
        assert client.decide("bandit-all", "warm", features=x).reason is Reason.MATCH
        stack.model.kill()
        started = time.monotonic()
        ranked = client.decide("rank-all", "u1", features=x, candidates=world.candidates())
        chosen = client.decide("bandit-all", "u2", features=x, default="editorial")
        ranked_plain = client.decide("ctr", "u3", features=world.ranker_rows(x[None, :], np.array([0]))[0],
                                     default=0.0)
        assert time.monotonic() - started < 3 * deadline + 0.3
        assert (ranked.reason, ranked.value, ranked.error_code) == (
            Reason.FALLBACK, {"theme": "editorial"}, ErrorCode.SYSTEM_FAILED)  # the arm's own fallback
        assert (chosen.reason, chosen.value, chosen.system) == (Reason.FALLBACK, "editorial", "bandit")
        assert "UNAVAILABLE" in (chosen.error_message or "") or "DEADLINE" in (chosen.error_message or "")
        assert (ranked_plain.reason, ranked_plain.value) == (Reason.FALLBACK, 0.0)
        assert client.decide("plain", "u4").value == {"system": "static", "theme": "music"}
        assert client.stats.fallbacks_served == 3
        assert client.flush()
    stack.group.stop("assignment")
    # The units were still exposed to their arm (the fallback is part of that arm's experience).
    exposed = set(read_table(stack.base / "lake", "exposures").column("unit").to_pylist())
    assert {"u1", "u2", "u3", "u4"} <= exposed


def test_model_server_restart_is_picked_up(stack: Stack) -> None:
    x = world.sample_users(1, np.random.default_rng(4))[0]
    with Client(stack.assignment.target, stack.model.target, SECRET, options=_opts()) as client:
        port = stack.model.port
        stack.group.stop("model")
        assert client.decide("bandit-all", "u1", features=x).reason is Reason.FALLBACK
        _start_model(stack.group, stack.trained.ranker.path.parents[1], stack.base / "lake", "model-again", port)
        deadline_at = time.monotonic() + 15
        while not all(client.decide("bandit-all", f"r{i}", features=x).reason is Reason.MATCH for i in range(4)):
            assert time.monotonic() < deadline_at
            time.sleep(0.1)


def test_strict_client_raises_on_fallback(stack: Stack) -> None:
    with Client(stack.assignment.target, stack.model.target, SECRET, options=_opts(strict=True)) as client:
        stack.model.kill()
        from client_sdk import TwofoldError

        with pytest.raises(TwofoldError) as err:
            client.decide("bandit-all", "u1", features=[0.1] * 5)
        assert err.value.code is ErrorCode.SYSTEM_FAILED


def test_async_decide_and_list_models(stack: Stack) -> None:
    users = world.sample_users(16, np.random.default_rng(5))

    async def main() -> None:
        async with AsyncClient(stack.assignment.target, stack.model.target, SECRET, options=_opts()) as client:
            models = {m.name: m for m in await client.list_models()}
            assert set(models) == {RANKER, BANDIT} and list(models[BANDIT].arms) == list(world.THEMES)
            decisions = await asyncio.gather(*(
                client.decide("rank-all" if i % 2 else "bandit-all", f"u{i}", features=x,
                              candidates=world.candidates()) for i, x in enumerate(users)))
            assert all(d.reason is Reason.MATCH for d in decisions)
            assert {d.system for d in decisions} == {"model", "bandit"}

    asyncio.run(main())
