"""The assignment server trusts nothing a client claims: local exposures, context numbers, old tokens.

Real server on loopback, real lake; the flags are the example's with the experiment rule limited
to production and two clients, one per environment.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from protos.twofold.assignment.v1 import assignment_pb2 as pb
from protos.twofold.assignment.v1 import assignment_pb2_grpc as pb_grpc
from tests.test_assignment_server import EXAMPLE, Harness, _ts
from twofold.lake import read_table
from twofold.resolver import Reason, Resolver, ResolverState
from twofold.testing import BackgroundLoop

ROOT = Path(__file__).resolve().parent.parent
DEV, PROD = "dev-secret", "prod-secret"
CLIENTS = f"""
---
client: dev
secrets:
  - {{secret: {DEV}, environments: [development]}}
---
client: prod
secrets:
  - {{secret: {PROD}, environments: [production]}}
"""


@pytest.fixture
def harness(bg_loop: BackgroundLoop, tmp_path: Path) -> Iterator[Harness]:
    flags = tmp_path / "flags"
    shutil.copytree(EXAMPLE, flags)
    spec = flags / "home-ranking.yaml"
    text = spec.read_text()
    assert "  - name: ranking-test\n" in text
    spec.write_text(text.replace("  - name: ranking-test\n", "  - name: ranking-test\n    environments: [production]\n")
                    + CLIENTS)
    h = Harness(bg_loop, tmp_path, flags)
    try:
        yield h
    finally:
        h.close()


def _production_assignments(h: Harness, count: int) -> list[pb.LocalAssignment]:
    """Exposures the server itself would make for the production client (its local evaluation)."""
    state = ResolverState.from_json(h.servicer.source.current.state_json)  # type: ignore[attr-defined]
    resolver = Resolver(state)
    out, now = [], time.time()
    for i in range(2000):
        f = resolver.resolve(["flags/home-ranking"], {"targeting_key": f"u{i}", "platform": "web"}, PROD)[0]
        if f.reason == Reason.MATCH and f.rule.endswith("ranking-test"):
            out.append(pb.LocalAssignment(flag=f.flag, unit=f"u{i}", variant=f.variant_name, rule=f.rule,
                                          assignment_id=f.assignment_id, resolve_id=f"local-{i}",
                                          apply_time=_ts(now)))
            if len(out) == count:
                return out
    raise AssertionError("too few units in the experiment")


def _apply(h: Harness, secret: str, local: list[pb.LocalAssignment]) -> pb.ApplyFlagsResponse:
    return h.stub.ApplyFlags(pb.ApplyFlagsRequest(client_secret=secret, send_time=_ts(time.time()),
                                                  local_assignments=local), timeout=10)


def _exposures(h: Harness) -> list[dict]:
    h.bg.run(h.servicer.exposures.flush())  # type: ignore[attr-defined]
    try:
        return read_table(h.lake, "exposures").to_pylist()
    except FileNotFoundError:
        return []


def test_a_dev_client_cannot_write_exposures_for_a_production_only_rule(harness: Harness) -> None:
    local = _production_assignments(harness, 20)
    reply = _apply(harness, DEV, local)
    assert (reply.accepted, reply.refused) == (0, 20)
    assert "enabled only in production" in reply.refusal
    assert _exposures(harness) == []
    assert 'twofold_assignment_applies_total{result="refused"} 20.0' in harness.metric("twofold_assignment_applies")
    # The production client, for which the server would have made exactly these, is accepted.
    reply = _apply(harness, PROD, local)
    assert (reply.accepted, reply.refused) == (20, 0)
    assert len(_exposures(harness)) == 20


def test_a_claimed_variant_the_bucket_does_not_give_is_refused_and_the_rest_written(harness: Harness) -> None:
    honest = _production_assignments(harness, 3)
    forged = pb.LocalAssignment()
    forged.CopyFrom(honest[0])
    forged.variant = next(v for v in ("static", "model", "bandit") if v != honest[0].variant.rpartition("/")[2])
    forged.resolve_id = "forged"
    wrong_rule = pb.LocalAssignment()
    wrong_rule.CopyFrom(honest[1])
    wrong_rule.rule = "flags/home-ranking/rules/no-such-rule"
    wrong_rule.resolve_id = "wrong-rule"
    reply = _apply(harness, PROD, [forged, wrong_rule, honest[2]])
    assert (reply.accepted, reply.refused) == (1, 2)
    assert "assigns unit" in reply.refusal
    rows = _exposures(harness)
    assert [(r["unit"], r["resolve_id"]) for r in rows] == [(honest[2].unit, honest[2].resolve_id)]


@pytest.mark.parametrize(("value", "field"), [
    (float("nan"), "age"), (float("inf"), "age"), (float("-inf"), "age"),
    ({"inner": [1.0, float("nan")]}, "nested.inner[1]"),
])
def test_non_finite_context_numbers_are_invalid_argument_naming_the_field(harness: Harness, value: object,
                                                                          field: str) -> None:
    request = pb.ResolveFlagsRequest(flags=["flags/home-ranking"], client_secret=PROD)
    request.evaluation_context.update({"targeting_key": "u1", "platform": "web"})
    key = field.split(".")[0].split("[")[0]
    request.evaluation_context.update({key: value})
    with pytest.raises(grpc.RpcError) as err:
        harness.stub.ResolveFlags(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"evaluation_context.{field}" in (err.value.details() or "")
    assert harness.resolve("u1", secret=PROD).resolved_flags[0].flag == "flags/home-ranking"


def test_resolve_tokens_expire(harness: Harness) -> None:
    harness.servicer.token_max_age = 1.0  # type: ignore[attr-defined]
    response = harness.resolve("user-7", secret=PROD)
    flag = response.resolved_flags[0]
    assert flag.should_apply and response.resolve_token

    def apply() -> pb.ApplyFlagsResponse:
        now = time.time()
        return harness.stub.ApplyFlags(pb.ApplyFlagsRequest(
            client_secret=PROD, resolve_token=response.resolve_token, send_time=_ts(now),
            flags=[pb.AppliedFlag(flag=flag.flag, apply_time=_ts(now))]), timeout=10)

    assert apply().accepted == 1
    time.sleep(1.3)
    with pytest.raises(grpc.RpcError) as err:
        apply()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "expired" in (err.value.details() or "")


def test_the_first_track_events_after_serving_is_not_slowed_by_pyarrow_warm_up() -> None:
    """The server says SERVING only once pyarrow is warm: the first call costs what later ones do."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready.json"
        proc = subprocess.Popen(
            [sys.executable, "-m", "twofold", "serve-assignment", "--flags", str(EXAMPLE), "--lake",
             str(Path(tmp) / "lake"), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
             "--ready-file", str(ready), "--log-level", "warning"], cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while not ready.exists():
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
            with grpc.insecure_channel(f"127.0.0.1:{json.loads(ready.read_text())['port']}") as channel:
                assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status \
                    == health_pb2.HealthCheckResponse.SERVING
                stub = pb_grpc.FlagResolverServiceStub(channel)
                took = []
                for i in range(6):
                    t0 = time.perf_counter()
                    stub.TrackEvents(pb.TrackEventsRequest(client_secret="twofold-local-dev-secret", events=[
                        pb.Event(event_id=f"e{i}", unit="u", name="n", value=1.0)]), timeout=10)
                    took.append(time.perf_counter() - t0)
            later = sorted(took[1:])[2]
            # Unwarmed, the first call took 0.6-0.9 s against ~3 ms for the next ones.
            assert took[0] < 0.25 + 3 * later, took
        finally:
            proc.terminate()
            proc.wait(timeout=20)
