"""What an arm names (DESIGN.md contract 4), turned into a call and back into a Decision.

A variant's value is a JSON object whose `system` key says what serves the unit:

    {"system": "static", ...}                               the value itself
    {"system": "model",  "model": "home-ranker"}            Score the caller's candidates
                                                            (or Predict its feature row)
    {"system": "bandit", "model": "home-linucb"}            Decide: arm, propensity, decision id
    {"system": "<name registered by the application>", ...} the application's function

Optional keys: `version` pins a model version, `top_k` trims a ranking, `fallback` is what
to serve when the system fails (else the caller's `default`; for a ranking with neither, the
candidates in the order the caller gave them, i.e. the unpersonalised experience).

This module only plans calls and interprets answers; the sync and asyncio clients do the
I/O, so both behave identically.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from client_sdk.convert import dense_rows, named_features
from client_sdk.results import Decision, ErrorCode, FlagResult, Reason
from protos.twofold.model.v1 import model_pb2

STATIC, MODEL, BANDIT = "static", "model", "bandit"
BUILTIN_SYSTEMS = frozenset({STATIC, MODEL, BANDIT})


@dataclass(frozen=True)
class SystemCall:
    """What a registered system gets: the flag's assignment and the caller's inputs."""

    flag: str
    unit: str
    variant: str | None
    arm: Mapping[str, Any]
    context: Mapping[str, Any]
    features: Any = None
    candidates: Any = None


@dataclass(frozen=True)
class SystemAnswer:
    """A registered system may return this instead of a bare value to fill in more of the Decision."""

    value: Any
    model: str | None = None
    model_version: str | None = None
    arm: str | None = None
    propensity: float | None = None
    decision_id: str | None = None
    scores: tuple[float, ...] = ()


# A registered system: returns a value or a SystemAnswer (the asyncio client also awaits
# an awaitable result). Raising means the system failed: the flag's fallback is served.
SystemFn = Callable[[SystemCall], Any]


class SystemRegistry:
    """Application-registered systems by name; the three built-in names cannot be replaced."""

    def __init__(self) -> None:
        self._systems: dict[str, SystemFn] = {}

    def register(self, name: str, fn: SystemFn) -> None:
        """Serve arms whose value says `{"system": name}` with `fn`."""
        if not name or not isinstance(name, str):
            raise ValueError("a system needs a non-empty name")
        if name in BUILTIN_SYSTEMS:
            raise ValueError(f"{name!r} is a built-in system and cannot be replaced")
        if not callable(fn):
            raise TypeError("a system must be callable")
        self._systems[name] = fn

    def unregister(self, name: str) -> None:
        self._systems.pop(name, None)

    def get(self, name: str) -> SystemFn | None:
        return self._systems.get(name)

    def names(self) -> list[str]:
        return sorted([*BUILTIN_SYSTEMS, *self._systems])


@dataclass
class Plan:
    """How `decide()` serves one flag result: an immediate Decision, a model call or a custom call."""

    result: FlagResult
    default: Any
    candidates_count: int | None
    system: str | None = None
    arm: Mapping[str, Any] = field(default_factory=dict)
    decision: Decision | None = None  # ready: no call needed
    method: str | None = None  # "Predict" | "Score" | "Decide"
    request: Any = None
    custom: SystemFn | None = None
    call: SystemCall | None = None


def fallback_value(arm: Mapping[str, Any], default: Any, candidates_count: int | None) -> Any:
    """What to serve when the arm's system fails (see the module docs for the order)."""
    if "fallback" in arm:
        return arm["fallback"]
    if default is not None:
        return default
    if candidates_count is not None:
        return list(range(candidates_count))
    return None


def _count(candidates: Any) -> int | None:
    if candidates is None:
        return None
    if isinstance(candidates, model_pb2.DenseRows):
        return int(candidates.rows)
    try:
        return len(candidates)
    except TypeError:
        return None


def plan(result: FlagResult, registry: SystemRegistry, context: Mapping[str, Any],
         features: Any, candidates: Any, default: Any, decision_id: str | None = None) -> Plan:
    """Decide what serving `result` takes. Never raises: bad inputs become a FALLBACK decision.

    `decision_id` (bandit arms) replays a decision: the policy's randomness derives from it.
    """
    count = _count(candidates)
    p = Plan(result=result, default=default, candidates_count=count)
    if not result.matched:
        # No assignment (no rule matched, or nothing known while the server is down): the
        # caller's default is the experience, with the resolve's reason.
        p.decision = Decision(flag=result.flag, unit=result.unit, value=default if default is not None
                              else fallback_value({}, None, count), system=None, reason=result.reason,
                              variant=result.variant, error_code=result.error_code,
                              error_message=result.error_message, flag_result=result)
        return p
    arm = result.value if isinstance(result.value, Mapping) else {}
    p.arm = arm
    system = arm.get("system", STATIC) if arm else STATIC
    p.system = system if isinstance(system, str) else None
    try:
        if p.system == STATIC:
            p.decision = Decision(flag=result.flag, unit=result.unit, value=result.value, system=STATIC,
                                  reason=result.reason, variant=result.variant, flag_result=result)
        elif p.system in (MODEL, BANDIT):
            _plan_model_call(p, features, candidates, decision_id)
        elif p.system is not None and (fn := registry.get(p.system)) is not None:
            p.custom = fn
            p.call = SystemCall(flag=result.flag, unit=result.unit, variant=result.variant, arm=arm,
                                context=context, features=features, candidates=candidates)
        else:
            p.decision = failed(p, ErrorCode.UNKNOWN_SYSTEM,
                                f"arm names system {system!r}, which this client does not know "
                                f"(known: {', '.join(registry.names())})")
    except (ValueError, TypeError) as exc:
        p.decision = failed(p, ErrorCode.BAD_ARM_VALUE, str(exc))
    return p


def _plan_model_call(p: Plan, features: Any, candidates: Any, decision_id: str | None) -> None:
    model = p.arm.get("model")
    if not isinstance(model, str) or not model:
        raise ValueError(f"a {p.system} arm needs a 'model' name, got {p.arm!r}")
    version = str(p.arm.get("version") or "")
    if p.system == BANDIT:
        if features is None:
            raise ValueError("a bandit arm needs the unit's context features (features=...)")
        request = model_pb2.DecideRequest(model=model, version=version, unit=p.result.unit,
                                          decision_id=decision_id or uuid.uuid4().hex)
        if isinstance(features, Mapping):
            request.named.CopyFrom(named_features(features))
        else:
            request.dense.CopyFrom(dense_rows(features))
        p.method, p.request = "Decide", request
    elif candidates is not None:
        request = model_pb2.ScoreRequest(model=model, version=version, candidates=dense_rows(candidates),
                                         top_k=int(p.arm.get("top_k") or 0))
        if features is not None:
            request.context.CopyFrom(dense_rows(features))
        p.method, p.request = "Score", request
    elif features is not None:
        request = model_pb2.PredictRequest(model=model, version=version)
        if isinstance(features, Mapping):
            request.named.CopyFrom(named_features(features))
        else:
            request.dense.CopyFrom(dense_rows(features))
        p.method, p.request = "Predict", request
    else:
        raise ValueError("a model arm needs candidates=... to rank or features=... to score")


def finish_model(p: Plan, response: Any) -> Decision:
    """The Decision for a model server answer."""
    r = p.result
    common = {"flag": r.flag, "unit": r.unit, "system": p.system, "reason": r.reason, "variant": r.variant,
              "model": response.model, "model_version": response.version, "flag_result": r}
    if p.method == "Decide":
        return Decision(value=response.arm, arm=response.arm, arm_index=response.arm_index,
                        propensity=response.propensity, decision_id=response.decision_id,
                        scores=tuple(response.scores), **common)
    if p.method == "Score":
        order = tuple(int(i) for i in response.order)
        return Decision(value=list(order), order=order, scores=tuple(response.scores), **common)
    outputs = tuple(response.outputs)
    value: Any = list(outputs) if response.rows > 1 or response.cols > 1 else (outputs[0] if outputs else None)
    return Decision(value=value, scores=outputs, **common)


def finish_custom(p: Plan, answer: Any) -> Decision:
    """The Decision for what a registered system returned."""
    r = p.result
    if isinstance(answer, SystemAnswer):
        return Decision(flag=r.flag, unit=r.unit, value=answer.value, system=p.system, reason=r.reason,
                        variant=r.variant, model=answer.model, model_version=answer.model_version,
                        arm=answer.arm, propensity=answer.propensity, decision_id=answer.decision_id,
                        scores=tuple(answer.scores), flag_result=r)
    return Decision(flag=r.flag, unit=r.unit, value=answer, system=p.system, reason=r.reason,
                    variant=r.variant, flag_result=r)


def failed(p: Plan, code: ErrorCode, message: str) -> Decision:
    """The fallback Decision, saying which system failed and why."""
    r = p.result
    return Decision(flag=r.flag, unit=r.unit, value=fallback_value(p.arm, p.default, p.candidates_count),
                    system=p.system, reason=Reason.FALLBACK, variant=r.variant, error_code=code,
                    error_message=message, model=p.arm.get("model") if p.arm else None, flag_result=r)


def failed_call(p: Plan, exc: BaseException) -> Decision:
    """The fallback Decision for an exception raised by the system's call."""
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        code = exc.code()
        details = exc.details() if hasattr(exc, "details") else ""
        return failed(p, ErrorCode.SYSTEM_FAILED, f"{p.system} {p.method} failed: {code.name}: {details}")
    if isinstance(exc, TimeoutError):
        return failed(p, ErrorCode.SYSTEM_FAILED, f"{p.system} timed out")
    return failed(p, ErrorCode.SYSTEM_FAILED, f"{p.system} failed: {type(exc).__name__}: {exc}")
