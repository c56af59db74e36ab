"""What the SDK hands back: resolved flags and decisions, errors as data.

Following OpenFeature's lead, a failure is a field of the result (a reason and an error
code), not an exception: a recommendation widget must render something even when a server
is down, and the caller decides what to do with the reason. Only a client in strict mode
raises (see `client_sdk.errors`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Reason(StrEnum):
    """Why a flag has the value it has, or why a decision was served the way it was."""

    # From the assignment server's resolver (contract 1/2).
    MATCH = "MATCH"  # a rule matched; the value is the assigned variant's
    NO_SEGMENT_MATCH = "NO_SEGMENT_MATCH"  # no rule matched; the caller's default applies
    FLAG_ARCHIVED = "FLAG_ARCHIVED"  # the flag is archived; the caller's default applies
    TARGETING_KEY_ERROR = "TARGETING_KEY_ERROR"  # unit missing, wrong type or too long
    # Made by the SDK.
    STALE = "STALE"  # assignment unreachable: the last value this client saw for this unit and flag
    DEFAULT = "DEFAULT"  # nothing known: the caller's default
    FALLBACK = "FALLBACK"  # the arm's system failed: the flag's fallback was served
    ERROR = "ERROR"  # the call failed in a way that is not an outage (bad input, unknown flag, ...)


class ErrorCode(StrEnum):
    """Machine-readable error codes; the OpenFeature provider maps them 1:1 where it can."""

    PROVIDER_NOT_READY = "PROVIDER_NOT_READY"  # local evaluation has no state yet
    FLAG_NOT_FOUND = "FLAG_NOT_FOUND"
    TARGETING_KEY_MISSING = "TARGETING_KEY_MISSING"
    INVALID_CONTEXT = "INVALID_CONTEXT"
    UNAVAILABLE = "UNAVAILABLE"  # server down or overloaded
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAUTHENTICATED = "UNAUTHENTICATED"  # wrong client secret
    SYSTEM_FAILED = "SYSTEM_FAILED"  # the model server (or a registered system) failed
    UNKNOWN_SYSTEM = "UNKNOWN_SYSTEM"  # the arm names a system this client does not know
    BAD_ARM_VALUE = "BAD_ARM_VALUE"  # the arm's value is not a valid system description
    GENERAL = "GENERAL"


@dataclass(frozen=True, slots=True)
class FlagResult:
    """One flag resolved for one unit.

    `value` is the variant's JSON object when `reason` is MATCH (or STALE), otherwise the
    caller's default. `variant` is the short variant name ("treatment"), None when the unit
    matched no rule. The ids identify the assignment in exposure records.
    """

    flag: str
    unit: str
    value: Any
    variant: str | None
    reason: Reason
    error_code: ErrorCode | None = None
    error_message: str | None = None
    rule: str = ""
    segment: str = ""
    assignment_id: str = ""
    resolve_id: str = ""
    should_apply: bool = False
    # True when resolved in process from the streamed state (exposure goes as a local assignment).
    local: bool = False
    # The resolve token the exposure is applied with (remote resolves only); opaque.
    resolve_token: bytes = field(default=b"", repr=False)

    @property
    def matched(self) -> bool:
        """True when the value comes from an assigned variant (fresh or stale)."""
        return self.variant is not None and self.reason in (Reason.MATCH, Reason.STALE)


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of `decide()`: what to show, which system chose it, and why.

    `value` is what the application uses: for a `static` arm the variant's value object,
    for a `model` arm the candidate indices best first (or the model outputs when no
    candidates were given), for a `bandit` arm the chosen arm's name, for a registered
    system whatever it returned; on failure the flag's fallback.
    """

    flag: str
    unit: str
    value: Any
    system: str | None
    reason: Reason
    variant: str | None = None
    error_code: ErrorCode | None = None
    error_message: str | None = None
    model: str | None = None
    model_version: str | None = None
    # Bandit arms.
    arm: str | None = None
    arm_index: int | None = None
    propensity: float | None = None
    decision_id: str | None = None
    # Model and bandit scores (one per candidate, or per arm).
    scores: tuple[float, ...] = ()
    order: tuple[int, ...] = ()
    flag_result: FlagResult | None = field(default=None, repr=False)

    @property
    def fallback(self) -> bool:
        """True when the application got the fallback instead of the system's answer."""
        return self.reason is Reason.FALLBACK


# Setting each slot through its descriptor: what FlagResult's frozen __init__ does through
# object.__setattr__ (by name, once per field), at about half the cost; a local resolve
# builds one result per call, so this is on the SDK's hottest path. Same fields, same class.
_new = object.__new__
_set_flag, _set_unit, _set_value, _set_variant, _set_reason, _set_error_code, _set_error_message, _set_rule, \
    _set_segment, _set_assignment_id, _set_resolve_id, _set_should_apply, _set_local, _set_resolve_token = (
        getattr(FlagResult, name).__set__ for name in (
            "flag", "unit", "value", "variant", "reason", "error_code", "error_message", "rule", "segment",
            "assignment_id", "resolve_id", "should_apply", "local", "resolve_token"))


def local_flag_result(flag: str, unit: str, value: Any, variant: str | None, reason: Reason,
                      error_code: ErrorCode | None, error_message: str | None, rule: str, segment: str,
                      assignment_id: str, resolve_id: str, should_apply: bool) -> FlagResult:
    """`FlagResult(..., local=True)` for a result resolved in process, built faster (equal to it)."""
    result = _new(FlagResult)
    _set_flag(result, flag)
    _set_unit(result, unit)
    _set_value(result, value)
    _set_variant(result, variant)
    _set_reason(result, reason)
    _set_error_code(result, error_code)
    _set_error_message(result, error_message)
    _set_rule(result, rule)
    _set_segment(result, segment)
    _set_assignment_id(result, assignment_id)
    _set_resolve_id(result, resolve_id)
    _set_should_apply(result, should_apply)
    _set_local(result, True)
    _set_resolve_token(result, b"")
    return result
