"""ModelService over a real gRPC server: Predict, Score, Decide, ListModels, errors, metrics."""

from __future__ import annotations

import math
from collections.abc import Iterator

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from model_server.randomness import uniforms
from model_server.runtime import PYTHON_CHECK_MAX, all_finite, session_options
from protos.twofold.model.v1 import model_pb2, model_pb2_grpc
from tests.model.conftest import ARMS, CONTEXT, FEATURES, Repo, Server, make_data, metric, scrape
from twofold.lake import read_table


@pytest.fixture(scope="module")
def stub(server: Server) -> Iterator[model_pb2_grpc.ModelServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield model_pb2_grpc.ModelServiceStub(channel)


def dense(x: np.ndarray) -> model_pb2.DenseRows:
    x = np.ascontiguousarray(x, dtype="<f4")
    return model_pb2.DenseRows(data=x.tobytes(), rows=x.shape[0], cols=x.shape[1])


def local(repo: Repo, model: str, version: str, feeds: dict[str, np.ndarray], output: str,
          threads: int = 1) -> np.ndarray:
    session = ort.InferenceSession(str(repo.root / model / version / "model.onnx"), session_options(threads))
    return session.run([output], feeds)[0]


def test_predict_dense_equals_local_onnx_runtime(stub, model_repo: Repo) -> None:
    x, _ = make_data(50, seed=7)
    response = stub.Predict(model_pb2.PredictRequest(model="ranker", dense=dense(x)))
    assert (response.model, response.version, response.rows, response.cols) == ("ranker", "1", 50, 1)
    assert list(response.output_names) == ["probability"]
    ours = np.array(response.outputs, dtype=np.float32)
    expected = local(model_repo, "ranker", "1", {"input": x}, "probabilities")[:, 1]
    np.testing.assert_array_equal(ours, expected)


def test_predict_named_matches_dense(stub) -> None:
    x, _ = make_data(1, seed=3)
    named = model_pb2.NamedFeatures(values={n: float(v) for n, v in zip(FEATURES, x[0], strict=True)})
    by_name = stub.Predict(model_pb2.PredictRequest(model="ranker", named=named))
    by_rows = stub.Predict(model_pb2.PredictRequest(model="ranker", dense=dense(x)))
    assert list(by_name.outputs) == list(by_rows.outputs)


def test_predict_regressor_and_nan_is_missing_for_xgboost(stub, model_repo: Repo) -> None:
    x, _ = make_data(5, seed=4)
    x[0, 2] = np.nan  # XGBoost treats NaN as "missing": legal for tree models
    response = stub.Predict(model_pb2.PredictRequest(model="value", dense=dense(x)))
    assert list(response.output_names) == ["prediction"] and response.cols == 1
    expected = local(model_repo, "value", "1", {"input": x}, "variable")[:, 0]
    np.testing.assert_array_equal(np.array(response.outputs, dtype=np.float32), expected)


def test_score_ranks_candidates_with_shared_context(stub, model_repo: Repo) -> None:
    rng = np.random.default_rng(11)
    context = rng.normal(size=(1, 2)).astype(np.float32)
    candidates = rng.normal(size=(100, 4)).astype(np.float32)
    response = stub.Score(model_pb2.ScoreRequest(model="ranker", context=dense(context),
                                                 candidates=dense(candidates)))
    full = np.hstack([np.repeat(context, 100, axis=0), candidates])
    # The server fixture scores batches of >= BATCH_ROWS rows with two ONNX Runtime threads: the
    # result is exactly a two-thread session's, and within float32 rounding of one thread's
    # (the trees' contributions are summed in another order).
    expected = local(model_repo, "ranker", "1", {"input": full}, "probabilities", threads=2)[:, 1]
    np.testing.assert_array_equal(np.array(response.scores, dtype=np.float32), expected)
    single = local(model_repo, "ranker", "1", {"input": full}, "probabilities")[:, 1]
    np.testing.assert_allclose(expected, single, rtol=1e-5, atol=1e-6)
    assert list(response.order) == list(np.argsort(-expected, kind="stable"))
    top = stub.Score(model_pb2.ScoreRequest(model="ranker", context=dense(context), candidates=dense(candidates),
                                            top_k=5))
    assert list(top.order) == list(response.order[:5]) and len(top.scores) == 100


def test_decide_returns_a_reproducible_logged_decision(stub, server: Server, model_repo: Repo) -> None:
    context = np.array([[1.2, -0.3, 1.0]], dtype=np.float32)
    first = stub.Decide(model_pb2.DecideRequest(model="thompson", unit="user-1", decision_id="d-1",
                                                dense=dense(context)))
    again = stub.Decide(model_pb2.DecideRequest(model="thompson", unit="user-1", decision_id="d-1",
                                                dense=dense(context)))
    assert (first.arm, first.arm_index, first.propensity) == (again.arm, again.arm_index, again.propensity)
    assert first.arm == ARMS[first.arm_index] and first.model == "thompson" and first.version == "1"
    # The response equals the graph run locally with the randomness derived from the decision id.
    feeds = {"context": context, "random": uniforms("d-1", 1 + 2 * 32 * 3)}
    probs = local(model_repo, "thompson", "1", feeds, "probabilities")[0]
    assert math.isclose(first.propensity, float(probs[first.arm_index]), rel_tol=1e-6)
    assert min(probs) >= 0.02 - 1e-7
    generated = stub.Decide(model_pb2.DecideRequest(
        model="linucb", unit="user-2", named=model_pb2.NamedFeatures(values=dict(zip(CONTEXT, [0.1, 0.2, 0.0],
                                                                                   strict=True)))))
    assert len(generated.decision_id) == 32 and generated.propensity > 0
    assert len(generated.scores) == len(ARMS)
    # Logged to the lake's decisions table, off the hot path but durably.
    server.flush_decisions()
    table = read_table(server.lake, "decisions").to_pylist()
    by_id = {row["decision_id"]: row for row in table}
    assert {"d-1", generated.decision_id} <= set(by_id)
    row = by_id["d-1"]
    assert (row["unit"], row["model"], row["model_version"], row["arm"]) == ("user-1", "thompson", "1", first.arm)
    assert math.isclose(row["propensity"], first.propensity, rel_tol=1e-9)
    np.testing.assert_allclose(row["features"], context[0], rtol=1e-7)
    assert by_id[generated.decision_id]["features"] == pytest.approx([0.1, 0.2, 0.0], rel=1e-6)


def test_list_models(stub) -> None:
    models = {m.name: m for m in stub.ListModels(model_pb2.ListModelsRequest()).models}
    assert set(models) == {"ranker", "value", "linucb", "thompson", "greedy"}
    assert models["ranker"].kind == "xgboost-classifier" and list(models["ranker"].feature_names) == FEATURES
    assert models["linucb"].kind == "bandit-linucb" and list(models["linucb"].arms) == ARMS
    assert models["greedy"].kind == "bandit-epsilon-greedy"
    assert [v.version for v in models["ranker"].versions] == ["1"] and models["ranker"].default_version == "1"
    assert models["ranker"].versions[0].ready and models["ranker"].versions[0].loaded_at_unix_ms > 0


BAD_REQUESTS = [
    ("unknown model", "Predict", model_pb2.PredictRequest(model="nope", dense=dense(np.zeros((1, 6)))),
     grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
    ("unknown version", "Predict", model_pb2.PredictRequest(model="ranker", version="9",
                                                            dense=dense(np.zeros((1, 6)))),
     grpc.StatusCode.NOT_FOUND, "no loaded version '9'"),
    ("wrong width", "Predict", model_pb2.PredictRequest(model="ranker", dense=dense(np.zeros((2, 5)))),
     grpc.StatusCode.INVALID_ARGUMENT, "takes 6 features"),
    ("bytes do not match shape", "Predict", model_pb2.PredictRequest(
        model="ranker", dense=model_pb2.DenseRows(data=b"\0" * 20, rows=1, cols=6)),
     grpc.StatusCode.INVALID_ARGUMENT, "needs 24 bytes of little-endian float32, got 20"),
    ("float64 sent as rows", "Predict", model_pb2.PredictRequest(
        model="ranker", dense=model_pb2.DenseRows(data=np.zeros((1, 6)).tobytes(), rows=1, cols=6)),
     grpc.StatusCode.INVALID_ARGUMENT, "got 48 bytes"),
    ("no input", "Predict", model_pb2.PredictRequest(model="ranker"),
     grpc.StatusCode.INVALID_ARGUMENT, "needs `dense` rows or `named` features"),
    ("unknown feature", "Predict", model_pb2.PredictRequest(model="ranker", named=model_pb2.NamedFeatures(
        values={**{n: 1.0 for n in FEATURES}, "colour": 2.0})),
     grpc.StatusCode.INVALID_ARGUMENT, "unknown feature(s) ['colour']"),
    ("missing feature", "Predict", model_pb2.PredictRequest(model="ranker", named=model_pb2.NamedFeatures(
        values={n: 1.0 for n in FEATURES[:-1]})),
     grpc.StatusCode.INVALID_ARGUMENT, "missing feature(s) ['score']"),
    ("NaN for a linear policy", "Decide", model_pb2.DecideRequest(
        model="linucb", unit="u", dense=dense(np.array([[0.0, np.nan, 1.0]]))),
     grpc.StatusCode.INVALID_ARGUMENT, "feature 'frequency' (row 0) is nan"),
    # One row is checked in Python, more than PYTHON_CHECK_MAX values with numpy: both refuse alike.
    ("inf for a linear policy", "Decide", model_pb2.DecideRequest(
        model="linucb", unit="u", dense=dense(np.array([[0.0, 1.0, np.inf]]))),
     grpc.StatusCode.INVALID_ARGUMENT, "context: feature 'mobile' (row 0) is inf; model 'linucb' does not accept"),
    ("-inf for a linear policy", "Decide", model_pb2.DecideRequest(
        model="linucb", unit="u", dense=dense(np.array([[-np.inf, 1.0, 0.0]]))),
     grpc.StatusCode.INVALID_ARGUMENT, "context: feature 'recency' (row 0) is -inf"),
    ("named inf for a linear policy", "Decide", model_pb2.DecideRequest(
        model="linucb", unit="u", named=model_pb2.NamedFeatures(values={"recency": 0.0, "frequency": math.inf,
                                                                        "mobile": 1.0})),
     grpc.StatusCode.INVALID_ARGUMENT, "named: feature 'frequency' (row 0) is inf"),
    *[(f"{bad} in one of many rows", "Predict", model_pb2.PredictRequest(
        model="linucb", dense=dense(np.where(np.arange(90).reshape(30, 3) == 52, bad, 0.0))),
       grpc.StatusCode.INVALID_ARGUMENT, f"dense: feature 'frequency' (row 17) is {bad}")
      for bad in (np.nan, np.inf, -np.inf)],
    ("two context rows", "Decide", model_pb2.DecideRequest(model="linucb", unit="u", dense=dense(np.zeros((2, 3)))),
     grpc.StatusCode.INVALID_ARGUMENT, "one context row"),
    ("no unit", "Decide", model_pb2.DecideRequest(model="linucb", dense=dense(np.zeros((1, 3)))),
     grpc.StatusCode.INVALID_ARGUMENT, "needs the `unit`"),
    ("Decide on a predictor", "Decide", model_pb2.DecideRequest(model="ranker", unit="u",
                                                                dense=dense(np.zeros((1, 6)))),
     grpc.StatusCode.INVALID_ARGUMENT, "not a bandit policy"),
    ("Score on a policy", "Score", model_pb2.ScoreRequest(model="linucb", candidates=dense(np.zeros((3, 3)))),
     grpc.StatusCode.INVALID_ARGUMENT, "ask it with Decide"),
    ("context + candidates too wide", "Score", model_pb2.ScoreRequest(
        model="ranker", context=dense(np.zeros((1, 3))), candidates=dense(np.zeros((4, 4)))),
     grpc.StatusCode.INVALID_ARGUMENT, "must make the 6 features"),
    ("zero rows", "Score", model_pb2.ScoreRequest(model="ranker", candidates=model_pb2.DenseRows(
        data=b"", rows=0, cols=6)), grpc.StatusCode.INVALID_ARGUMENT, "at least 1"),
]


@pytest.mark.parametrize(("case", "method", "request_", "code", "message"), BAD_REQUESTS,
                         ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_are_refused_with_a_clear_message(stub, server: Server, case: str, method: str,
                                                       request_: object, code: grpc.StatusCode,
                                                       message: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, method)(request_, timeout=5)
    assert err.value.code() == code, err.value.details()
    assert message in err.value.details()
    # The server keeps serving.
    ok = stub.Predict(model_pb2.PredictRequest(model="ranker", dense=dense(np.zeros((1, 6)))), timeout=5)
    assert ok.rows == 1


@pytest.mark.parametrize("size", [1, 20, PYTHON_CHECK_MAX, PYTHON_CHECK_MAX + 1, 1000])
def test_all_finite_on_both_sides_of_the_python_threshold(size: int) -> None:
    x = np.full((1, size), np.finfo(np.float32).max, dtype=np.float32)  # a float32 sum would overflow
    assert all_finite(x) and all_finite(-x)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[0, size // 2] = bad
        assert not all_finite(y)
    assert not all_finite(np.array([[np.inf, -np.inf]], dtype=np.float32))  # inf - inf is NaN, still caught
    # Finite float64 values can overflow a sum: other dtypes always take numpy's check.
    assert all_finite(np.full((1, size), np.finfo(np.float64).max))


def test_metrics_per_model_version_and_bandit(stub, server: Server) -> None:
    port = server.running.metrics_port
    assert port
    before = scrape(port)
    for i in range(7):
        stub.Decide(model_pb2.DecideRequest(model="greedy", unit=f"u{i}", dense=dense(np.zeros((1, 3)))))
    stub.Predict(model_pb2.PredictRequest(model="ranker", dense=dense(np.zeros((4, 6)))))
    with pytest.raises(grpc.RpcError):
        stub.Predict(model_pb2.PredictRequest(model="ranker", dense=dense(np.zeros((1, 2)))))
    after = scrape(port)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("twofold_model_requests_total", model="greedy", version="1", method="Decide") == 7
    assert delta("twofold_bandit_decisions_total", model="greedy", version="1") == 7
    assert delta("twofold_bandit_propensity_count", model="greedy") == 7
    assert delta("twofold_model_requests_total", model="ranker", version="1", method="Predict") == 1
    assert delta("twofold_model_batch_size_sum", model="ranker", method="Predict") == 4
    assert delta("twofold_model_failures_total", model="ranker", version="1", reason="wrong_shape") == 1
    assert delta("twofold_model_latency_seconds_count", model="ranker", version="1", method="Predict") == 1
    assert 'le="2.5e-05"' in after  # sub-millisecond buckets from 25 µs
    assert metric(after, "twofold_model_loaded_versions", model="ranker") == 1
    assert "twofold_model_load_failures_total" in after or "twofold_model_load_failures" in after


def test_server_made_decision_ids_are_unique_v4_uuids_also_across_forked_workers() -> None:
    import os
    import uuid

    from model_server.service import new_decision_id

    ids = [new_decision_id() for _ in range(100_000)]
    assert len(set(ids)) == len(ids)
    for text in ids[:1000]:
        parsed = uuid.UUID(hex=text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and parsed.hex == text
    # --workers forks after import: each worker must draw its own ids, not replay the parent's.
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, new_decision_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 32 and child != new_decision_id()
