"""An OpenFeature provider backed by the Twofold client.

    from openfeature import api
    from client_sdk.provider import TwofoldProvider

    api.set_provider(TwofoldProvider(Client(assignment="dns:///assignment:50051", client_secret="s")))
    flags = api.get_client()
    color = flags.get_string_value("checkout.button_color", "blue",
                                   EvaluationContext(targeting_key="user-42", attributes={"country": "SE"}))

A Twofold flag's value is a JSON object; as in Confidence's providers, a flag key may carry a
dotted path into it (`checkout.button_color`). Without a path the whole object is returned
(object evaluation). Evaluating a flag logs its exposure (the value is being used), batched
and deduplicated by the client. The mapping of reasons and error codes is in `_REASONS` and
`_ERRORS`, and documented in docs/sdk.md.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from openfeature.evaluation_context import EvaluationContext
from openfeature.event import ProviderEventDetails
from openfeature.exception import ErrorCode as OFErrorCode
from openfeature.exception import ProviderNotReadyError
from openfeature.flag_evaluation import FlagResolutionDetails, FlagValueType
from openfeature.flag_evaluation import Reason as OFReason
from openfeature.provider import AbstractProvider, Metadata
from openfeature.track import TrackingEventDetails

from client_sdk.async_client import AsyncClient
from client_sdk.local import private_copy
from client_sdk.results import ErrorCode, FlagResult, Reason
from client_sdk.sync_client import Client

_REASONS: dict[Reason, OFReason] = {
    Reason.MATCH: OFReason.TARGETING_MATCH,
    Reason.NO_SEGMENT_MATCH: OFReason.DEFAULT,
    Reason.FLAG_ARCHIVED: OFReason.DISABLED,
    Reason.STALE: OFReason.STALE,
    Reason.DEFAULT: OFReason.DEFAULT,
    Reason.TARGETING_KEY_ERROR: OFReason.ERROR,
    Reason.ERROR: OFReason.ERROR,
    Reason.FALLBACK: OFReason.ERROR,
}

# Flag keys whose split is remembered (a bound, should callers build keys dynamically).
_MAX_REMEMBERED_KEYS = 4096

_ERRORS: dict[ErrorCode, OFErrorCode] = {
    ErrorCode.PROVIDER_NOT_READY: OFErrorCode.PROVIDER_NOT_READY,
    ErrorCode.FLAG_NOT_FOUND: OFErrorCode.FLAG_NOT_FOUND,
    ErrorCode.TARGETING_KEY_MISSING: OFErrorCode.TARGETING_KEY_MISSING,
    ErrorCode.INVALID_CONTEXT: OFErrorCode.INVALID_CONTEXT,
}


_SCALARS = frozenset({str, int, float, bool, type(None)})


def _context_attributes(context: EvaluationContext | None) -> tuple[str | None, Mapping[str, Any]]:
    """(targeting key, JSON-ready attributes): datetimes become ISO-8601 strings.

    Attributes that are all scalars under string keys (the usual case) are handed on as they
    are, not copied: the client copies them into its own evaluation context anyway.
    """
    if context is None:
        return None, {}
    attributes = context.attributes
    for key, value in attributes.items():
        if type(key) is not str or type(value) not in _SCALARS:
            break
    else:
        return context.targeting_key, attributes

    def plain(value: Any) -> Any:
        if isinstance(value, dt.datetime):
            return value.isoformat()
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, Sequence) and not isinstance(value, str):
            return [plain(v) for v in value]
        return value

    return context.targeting_key, {str(k): plain(v) for k, v in context.attributes.items()}


def _type_ok(value: Any, expected: type) -> bool:
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer())
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is str:
        return isinstance(value, str)
    return isinstance(value, (Mapping, list))


def _coerce(value: Any, expected: type) -> Any:
    if expected is int:
        return int(value)
    if expected is float:
        return float(value)
    return value


class TwofoldProvider(AbstractProvider):
    """OpenFeature provider over a Twofold `Client` (and optionally an `AsyncClient` for the async API).

    With `owns_client=True` (the default) `shutdown()` closes the clients; otherwise it only
    flushes them.
    """

    def __init__(self, client: Client, async_client: AsyncClient | None = None, *, owns_client: bool = True) -> None:
        super().__init__()
        self.client = client
        self.async_client = async_client
        self.owns_client = owns_client
        self._keys: dict[str, tuple[str, list[str]]] = {}

    def get_metadata(self) -> Metadata:
        return Metadata(name="twofold")

    def initialize(self, evaluation_context: EvaluationContext) -> None:
        """Local evaluation: wait for the first state snapshot (not ready in time is an error),
        then emit PROVIDER_CONFIGURATION_CHANGED whenever a new flag state arrives."""
        if not self.client.options.local_evaluation:
            return
        if not self.client.wait_for_state():
            raise ProviderNotReadyError("no state received from the assignment server in time")
        first = self.client.state_generation

        def changed(generation: int) -> None:
            if generation != first:
                self.emit_provider_configuration_changed(
                    ProviderEventDetails(message=f"flag state generation {generation}"))

        self.client.on_state_change(changed)

    def shutdown(self) -> None:
        if self.owns_client:
            self.client.close()
            if self.async_client is not None:
                self.async_client._flush_at_exit()
        else:
            self.client.flush()

    def track(self, tracking_event_name: str, evaluation_context: EvaluationContext | None = None,
              tracking_event_details: TrackingEventDetails | None = None) -> None:
        """Send a metric event for the context's targeting key (ignored without one, as the spec allows)."""
        unit, _ = _context_attributes(evaluation_context)
        if not unit:
            return
        details = tracking_event_details or TrackingEventDetails()
        self.client.track(tracking_event_name, unit, details.value, properties=details.attributes or None)

    # ---- evaluation --------------------------------------------------------------------

    def _details(self, flag_key: str, default: Any, result: FlagResult | None, path: list[str],
                 expected: type, apply: Any) -> FlagResolutionDetails[Any]:
        if result is None:
            return FlagResolutionDetails(value=default, reason=OFReason.ERROR,
                                         error_code=OFErrorCode.TARGETING_KEY_MISSING,
                                         error_message="the evaluation context has no targeting key")
        metadata = {}
        if result.rule:
            metadata["rule"] = result.rule
        if result.assignment_id:
            metadata["assignment_id"] = result.assignment_id
        if result.resolve_id:
            metadata["resolve_id"] = result.resolve_id
        if not result.matched:
            if result.error_code is None:
                return FlagResolutionDetails(value=default, reason=_REASONS[result.reason], flag_metadata=metadata)
            # Abnormal execution (server unreachable, bad request): reason ERROR with the code.
            return FlagResolutionDetails(value=default, reason=OFReason.ERROR,
                                         error_code=_ERRORS.get(result.error_code, OFErrorCode.GENERAL),
                                         error_message=result.error_message, flag_metadata=metadata)
        value: Any = result.value
        for step in path:
            if type(value) is dict and step in value:  # the usual case, without an ABC check
                value = value[step]
                continue
            if not isinstance(value, Mapping) or step not in value:
                return FlagResolutionDetails(
                    value=default, reason=OFReason.ERROR, error_code=OFErrorCode.FLAG_NOT_FOUND,
                    error_message=f"flag {result.flag!r} has no property {'.'.join(path)!r}",
                    variant=result.variant, flag_metadata=metadata)
            value = value[step]
        if not (type(value) is expected and expected is not dict) and not _type_ok(value, expected):
            return FlagResolutionDetails(
                value=default, reason=OFReason.ERROR, error_code=OFErrorCode.TYPE_MISMATCH,
                error_message=f"{flag_key!r} is {type(value).__name__}, not {expected.__name__}",
                variant=result.variant, flag_metadata=metadata)
        apply(result)
        if type(value) is not expected:
            value = _coerce(value, expected)
        if result.local and type(value) is not str:
            value = private_copy(value)  # a planned local resolve shares the value with the state
        reason = OFReason.TARGETING_MATCH if result.reason is Reason.MATCH else _REASONS[result.reason]
        return FlagResolutionDetails(value=value, reason=reason, variant=result.variant, flag_metadata=metadata)

    def _split(self, flag_key: str) -> tuple[str, list[str]]:
        """(flag, property path) of a flag key, remembered: the same few keys are evaluated again and again."""
        split = self._keys.get(flag_key)
        if split is None:
            flag, *path = flag_key.split(".")
            split = (flag, path)
            if len(self._keys) < _MAX_REMEMBERED_KEYS:
                self._keys[flag_key] = split
        return split

    def _evaluate(self, flag_key: str, default: Any, context: EvaluationContext | None,
                  expected: type) -> FlagResolutionDetails[Any]:
        flag, path = self._split(flag_key)
        unit, attributes = _context_attributes(context)
        result = None
        if unit:
            # Only the value at `path` is handed out (copied in `_details` unless a string): no
            # need to copy the flag's whole value first.
            result = self.client._resolve_planned(flag, unit, attributes, None, copy_value=False) \
                or self.client.resolve(flag, unit, attributes)
        return self._details(flag_key, default, result, path, expected, self.client.apply)

    async def _evaluate_async(self, flag_key: str, default: Any, context: EvaluationContext | None,
                              expected: type) -> FlagResolutionDetails[Any]:
        if self.async_client is None:
            return await asyncio.to_thread(self._evaluate, flag_key, default, context, expected)
        flag, path = self._split(flag_key)
        unit, attributes = _context_attributes(context)
        result = await self.async_client.resolve(flag, unit, attributes) if unit else None
        return self._details(flag_key, default, result, path, expected, self.async_client.apply)

    def resolve_boolean_details(self, flag_key: str, default_value: bool,
                                evaluation_context: EvaluationContext | None = None) -> FlagResolutionDetails[bool]:
        return self._evaluate(flag_key, default_value, evaluation_context, bool)

    def resolve_string_details(self, flag_key: str, default_value: str,
                               evaluation_context: EvaluationContext | None = None) -> FlagResolutionDetails[str]:
        return self._evaluate(flag_key, default_value, evaluation_context, str)

    def resolve_integer_details(self, flag_key: str, default_value: int,
                                evaluation_context: EvaluationContext | None = None) -> FlagResolutionDetails[int]:
        return self._evaluate(flag_key, default_value, evaluation_context, int)

    def resolve_float_details(self, flag_key: str, default_value: float,
                              evaluation_context: EvaluationContext | None = None) -> FlagResolutionDetails[float]:
        return self._evaluate(flag_key, default_value, evaluation_context, float)

    def resolve_object_details(
        self, flag_key: str, default_value: Sequence[FlagValueType] | Mapping[str, FlagValueType],
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[Sequence[FlagValueType] | Mapping[str, FlagValueType]]:
        return self._evaluate(flag_key, default_value, evaluation_context, dict)

    async def resolve_boolean_details_async(
            self, flag_key: str, default_value: bool,
            evaluation_context: EvaluationContext | None = None) -> FlagResolutionDetails[bool]:
        return await self._evaluate_async(flag_key, default_value, evaluation_context, bool)

    async def resolve_string_details_async(
            self, flag_key: str, default_value: str,
            evaluation_context: EvaluationContext | None = None) -> FlagResolutionDetails[str]:
        return await self._evaluate_async(flag_key, default_value, evaluation_context, str)

    async def resolve_integer_details_async(
            self, flag_key: str, default_value: int,
            evaluation_context: EvaluationContext | None = None) -> FlagResolutionDetails[int]:
        return await self._evaluate_async(flag_key, default_value, evaluation_context, int)

    async def resolve_float_details_async(
            self, flag_key: str, default_value: float,
            evaluation_context: EvaluationContext | None = None) -> FlagResolutionDetails[float]:
        return await self._evaluate_async(flag_key, default_value, evaluation_context, float)

    async def resolve_object_details_async(
        self, flag_key: str, default_value: Sequence[FlagValueType] | Mapping[str, FlagValueType],
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[Sequence[FlagValueType] | Mapping[str, FlagValueType]]:
        return await self._evaluate_async(flag_key, default_value, evaluation_context, dict)
