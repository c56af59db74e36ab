"""The SDK's shared core without the network: queues, deduplication, plans, conversions.

Everything that involves a server is tested against the real servers in test_sdk_client.py;
here is the logic both client flavours share, checked exactly.
"""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from client_sdk import ClientOptions, Decision, ErrorCode, FlagResult, Reason
from client_sdk.channels import IDEMPOTENT_METHODS, service_config
from client_sdk.convert import dense_rows, python_to_struct, struct_to_python
from client_sdk.core import ClientCore, flag_name, variant_name
from client_sdk.options import RetryPolicy
from client_sdk.systems import SystemAnswer, SystemRegistry, failed_call, finish_custom, finish_model, plan
from protos.twofold.assignment.v1 import assignment_pb2 as apb
from protos.twofold.model.v1 import model_pb2


def _result(flag: str = "home", unit: str = "u1", value: object = None, variant: str | None = "treatment",
            token: bytes = b"tok", local: bool = False, reason: Reason = Reason.MATCH) -> FlagResult:
    return FlagResult(flag=flag, unit=unit, value=value if value is not None else {"system": "static", "x": 1},
                      variant=variant, reason=reason, rule="flags/home/rules/r1", assignment_id="a1",
                      resolve_id="r-" + unit, should_apply=variant is not None, local=local, resolve_token=token)


def test_names() -> None:
    assert flag_name("flags/home-ranking") == "home-ranking"
    assert flag_name("home-ranking") == "home-ranking"
    assert variant_name("flags/home/variants/bandit") == "bandit"
    assert variant_name("") is None


def test_struct_round_trip_keeps_nested_values() -> None:
    doc = {"system": "model", "model": "m", "top_k": 3.0, "nested": {"a": [1.0, "x", True, None]}, "flag": False}
    assert struct_to_python(python_to_struct(doc)) == doc


def test_dense_rows_are_little_endian_float32() -> None:
    rows = dense_rows([[1.0, 2.5], [3.0, -4.0]])
    assert (rows.rows, rows.cols) == (2, 2)
    assert np.frombuffer(rows.data, dtype="<f4").tolist() == [1.0, 2.5, 3.0, -4.0]
    one = dense_rows(np.arange(3))
    assert (one.rows, one.cols) == (1, 3)
    with pytest.raises(ValueError, match="non-empty"):
        dense_rows(np.zeros((2, 2, 2)))


def test_exposures_are_deduplicated_and_grouped_per_token() -> None:
    core = ClientCore("secret", ClientOptions(flush_at_exit=False))
    core.use(_result(unit="u1", token=b"t1"))
    core.use(_result(unit="u1", token=b"t1"))           # same unit, flag, variant: deduplicated
    core.use(_result(flag="other", unit="u1", token=b"t1"))
    core.use(_result(unit="u2", token=b"t2"))
    core.use(_result(unit="u3", variant=None, token=b"t3"))  # no assignment: nothing to expose
    assert core.stats.exposures_queued == 3 and core.stats.exposures_deduplicated == 1
    requests = core.exposures.drain("secret")
    by_token = {r.resolve_token: sorted(f.flag for f in r.flags) for r in requests}
    assert by_token == {b"t1": ["flags/home", "flags/other"], b"t2": ["flags/home"]}
    assert all(r.client_secret == "secret" and r.sdk.startswith("twofold-python/") for r in requests)
    assert len(core.exposures) == 0


def test_exposure_dedup_expires() -> None:
    core = ClientCore("s", ClientOptions(flush_at_exit=False, exposure_dedup_seconds=10))
    assert core.exposures.add(_result(), now_ns=0)
    assert not core.exposures.add(_result(), now_ns=9 * 10**9)
    assert core.exposures.add(_result(), now_ns=11 * 10**9)


def test_local_exposures_batch_into_local_assignments() -> None:
    core = ClientCore("s", ClientOptions(flush_at_exit=False, batch_size=2, max_buffered=10))
    for i in range(5):
        core.use(_result(unit=f"u{i}", local=True, token=b""))
    requests = core.exposures.drain("s")
    assert [len(r.local_assignments) for r in requests] == [2, 2, 1]
    first = requests[0].local_assignments[0]
    assert (first.flag, first.unit, first.variant, first.rule, first.assignment_id) == \
        ("flags/home", "u0", "treatment", "flags/home/rules/r1", "a1")
    assert first.apply_time.seconds > 0


def test_queues_are_bounded_and_count_drops() -> None:
    core = ClientCore("s", ClientOptions(flush_at_exit=False, batch_size=2, max_buffered=3))
    for i in range(5):
        core.use(_result(unit=f"u{i}", token=f"t{i}".encode()))
        core.track("purchase", f"u{i}", 1.0)
    assert len(core.exposures) == 3 and core.stats.exposures_dropped == 2
    assert len(core.events) == 3 and core.stats.events_dropped == 2
    # The newest survive.
    assert {r.resolve_token for r in core.exposures.drain("s")} == {b"t2", b"t3", b"t4"}
    assert [e.unit for r in core.events.drain("s") for e in r.events] == ["u2", "u3", "u4"]


def test_failed_delivery_is_requeued_with_the_same_ids() -> None:
    core = ClientCore("s", ClientOptions(flush_at_exit=False))
    ids = [core.track("purchase", "u1", 2.0, {"sku": "a"}) for _ in range(3)]
    assert len(set(ids)) == 3
    core.use(_result())
    requests = core.drain_all()
    for request in requests:
        core.stamp_send_time(request)
    assert all(r.send_time.seconds > 0 for r in requests)

    class Unavailable(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return "down"

    for request in requests:
        core.delivery_failed(Unavailable(), request)
    again = core.drain_all()
    events = [e for r in again if isinstance(r, apb.TrackEventsRequest) for e in r.events]
    assert [e.event_id for e in events] == ids
    assert events[0].value == 2.0 and struct_to_python(events[0].properties) == {"sku": "a"}
    applies = [r for r in again if isinstance(r, apb.ApplyFlagsRequest)]
    assert [f.flag for r in applies for f in r.flags] == ["flags/home"]


def test_events_validate_input() -> None:
    core = ClientCore("s", ClientOptions(flush_at_exit=False))
    with pytest.raises(ValueError, match="name"):
        core.track("", "u1")
    with pytest.raises(ValueError, match="unit"):
        core.track("purchase", "")
    with pytest.raises(ValueError, match="finite"):
        core.track("purchase", "u1", float("nan"))
    event_id = core.track("view", "u1")
    [request] = core.events.drain("s")
    assert request.events[0].event_id == event_id and not request.events[0].HasField("value")


def test_plans_for_each_system() -> None:
    registry = SystemRegistry()
    static = plan(_result(value={"system": "static", "color": "red"}), registry, {}, None, None, None)
    assert static.decision is not None and static.decision.value == {"system": "static", "color": "red"}
    assert static.decision.reason is Reason.MATCH

    ranker = plan(_result(value={"system": "model", "model": "ranker", "top_k": 2.0}), registry, {},
                  [1.0, 2.0], np.eye(3), None)
    assert ranker.method == "Score" and ranker.request.top_k == 2
    assert (ranker.request.candidates.rows, ranker.request.context.cols) == (3, 2)

    bandit = plan(_result(value={"system": "bandit", "model": "linucb", "version": "3"}), registry, {},
                  {"age": 1.0}, None, None)
    assert bandit.method == "Decide" and bandit.request.version == "3" and bandit.request.unit == "u1"
    assert len(bandit.request.decision_id) == 32 and dict(bandit.request.named.values) == {"age": 1.0}

    predict = plan(_result(value={"system": "model", "model": "ctr"}), registry, {}, [0.5], None, None)
    assert predict.method == "Predict" and predict.request.dense.cols == 1


def test_plan_failures_serve_the_fallback_in_order() -> None:
    registry = SystemRegistry()
    arm = {"system": "bandit", "model": "linucb", "fallback": {"theme": "editorial"}}
    # The arm's own fallback wins over the caller's default.
    no_features = plan(_result(value=arm), registry, {}, None, None, default="caller-default")
    assert no_features.decision is not None and no_features.decision.reason is Reason.FALLBACK
    assert no_features.decision.value == {"theme": "editorial"}
    assert no_features.decision.error_code is ErrorCode.BAD_ARM_VALUE
    unknown = plan(_result(value={"system": "rules-engine"}), registry, {}, None, None, default="d")
    assert unknown.decision is not None and unknown.decision.error_code is ErrorCode.UNKNOWN_SYSTEM
    assert unknown.decision.value == "d" and "rules-engine" in (unknown.decision.error_message or "")
    # A ranking without fallback or default falls back to the candidates' given order.
    ranker = plan(_result(value={"system": "model", "model": "r"}), registry, {}, None, np.eye(4), None)
    assert ranker.request is not None

    class Deadline(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.DEADLINE_EXCEEDED

        def details(self) -> str:
            return "too slow"

    failed = failed_call(ranker, Deadline())
    assert failed.value == [0, 1, 2, 3] and failed.reason is Reason.FALLBACK and failed.fallback
    assert failed.error_code is ErrorCode.SYSTEM_FAILED and "DEADLINE_EXCEEDED" in (failed.error_message or "")


def test_unassigned_units_get_the_default_with_the_resolve_reason() -> None:
    result = _result(variant=None, reason=Reason.NO_SEGMENT_MATCH, value={"x": 1})
    p = plan(result, SystemRegistry(), {}, None, None, default="static-home")
    assert p.decision == Decision(flag="home", unit="u1", value="static-home", system=None,
                                  reason=Reason.NO_SEGMENT_MATCH, flag_result=result)


def test_registered_systems() -> None:
    registry = SystemRegistry()
    with pytest.raises(ValueError, match="built-in"):
        registry.register("bandit", lambda call: None)
    registry.register("rules", lambda call: f"{call.unit}:{call.arm['level']}")
    p = plan(_result(value={"system": "rules", "level": 3.0}), registry, {"country": "SE"}, None, None, None)
    assert p.custom is not None and p.call is not None and p.call.context == {"country": "SE"}
    assert finish_custom(p, p.custom(p.call)).value == "u1:3.0"
    rich = finish_custom(p, SystemAnswer(value="x", arm="a", propensity=0.5, model="rules-v1"))
    assert (rich.arm, rich.propensity, rich.model, rich.system) == ("a", 0.5, "rules-v1", "rules")


def test_model_answers_become_decisions() -> None:
    registry = SystemRegistry()
    p = plan(_result(value={"system": "model", "model": "r"}), registry, {}, [1.0], np.eye(3), None)
    d = finish_model(p, model_pb2.ScoreResponse(model="r", version="2", scores=[0.1, 0.9, 0.5], order=[1, 2, 0]))
    assert (d.value, d.order, d.model_version, d.system) == ([1, 2, 0], (1, 2, 0), "2", "model")
    assert d.scores == pytest.approx((0.1, 0.9, 0.5))
    b = plan(_result(value={"system": "bandit", "model": "b"}), registry, {}, [1.0], None, None)
    d = finish_model(b, model_pb2.DecideResponse(decision_id="d1", arm="deals", arm_index=3, propensity=0.91,
                                                 model="b", version="7"))
    assert (d.value, d.arm, d.arm_index, d.propensity, d.decision_id, d.model_version) == \
        ("deals", "deals", 3, pytest.approx(0.91), "d1", "7")


def test_service_config_retries_only_idempotent_methods() -> None:
    config = json.loads(service_config(RetryPolicy(max_attempts=4, initial_backoff=0.02, max_backoff=0.5)))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    [method_config] = config["methodConfig"]
    assert {(n["service"], n["method"]) for n in method_config["name"]} == set(IDEMPOTENT_METHODS)
    assert ("twofold.assignment.v1.FlagResolverService", "WatchState") not in IDEMPOTENT_METHODS
    assert method_config["retryPolicy"] == {"maxAttempts": 4, "initialBackoff": "0.020s", "maxBackoff": "0.500s",
                                            "backoffMultiplier": 2.0, "retryableStatusCodes": ["UNAVAILABLE"]}
    assert "methodConfig" not in json.loads(service_config(RetryPolicy(max_attempts=1)))


def test_options_refuse_nonsense() -> None:
    with pytest.raises(ValueError):
        ClientOptions(channels=0)
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=9)
    with pytest.raises(ValueError):
        ClientOptions(batch_size=10, max_buffered=5)
