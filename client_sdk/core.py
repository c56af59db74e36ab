"""The client core shared by the blocking and the asyncio client: all logic, no I/O.

The two clients differ only in how they wait for the network. Everything else lives here,
once: building requests, reading answers, what to serve when a server is down (the last
known value, else the default), the exposure queue (deduplicated, batched per resolve
token or as local assignments) and the event queue (client-made ids, so a retried batch
is counted once). The queues are bounded: while a server is unreachable the oldest
records are dropped and counted rather than growing without limit.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from client_sdk.convert import now_timestamp, python_to_struct, struct_to_python, timestamp_from_ns
from client_sdk.errors import TwofoldError
from client_sdk.local import LocalState
from client_sdk.names import flag_name, variant_name
from client_sdk.options import ClientOptions
from client_sdk.results import Decision, ErrorCode, FlagResult, Reason, local_flag_result
from client_sdk.systems import SystemFn, SystemRegistry
from protos.twofold.assignment.v1 import assignment_pb2 as apb
from twofold import __version__

_log = logging.getLogger("twofold.sdk")

SDK_NAME = f"twofold-python/{__version__}"
TARGETING_KEY = "targeting_key"

_REASONS = {
    apb.RESOLVE_REASON_MATCH: Reason.MATCH,
    apb.RESOLVE_REASON_NO_SEGMENT_MATCH: Reason.NO_SEGMENT_MATCH,
    apb.RESOLVE_REASON_NO_TREATMENT_MATCH: Reason.NO_SEGMENT_MATCH,
    apb.RESOLVE_REASON_FLAG_ARCHIVED: Reason.FLAG_ARCHIVED,
    apb.RESOLVE_REASON_TARGETING_KEY_ERROR: Reason.TARGETING_KEY_ERROR,
    apb.RESOLVE_REASON_ERROR: Reason.ERROR,
}

# The in-process resolver's reasons (the ResolveReason names) straight to the SDK's.
_LOCAL_REASONS = {name: _REASONS.get(apb.ResolveReason.Value(name), Reason.ERROR)
                  for name in apb.ResolveReason.keys()}
_LOCAL_ERRORS = {
    Reason.TARGETING_KEY_ERROR: (ErrorCode.TARGETING_KEY_MISSING, "the unit is missing, not a string or too long"),
    Reason.ERROR: (ErrorCode.GENERAL, "the resolver reported an error"),
}

# Codes that mean "the server is not there or not answering": serve the last known value.
_OUTAGE_CODES = {
    grpc.StatusCode.UNAVAILABLE: ErrorCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: ErrorCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ErrorCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED: ErrorCode.UNAVAILABLE,
    grpc.StatusCode.INTERNAL: ErrorCode.UNAVAILABLE,
    grpc.StatusCode.UNKNOWN: ErrorCode.UNAVAILABLE,
}
# Codes that mean "the request is wrong": a stale value would hide the mistake.
_REQUEST_CODES = {
    grpc.StatusCode.NOT_FOUND: ErrorCode.FLAG_NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT: ErrorCode.INVALID_CONTEXT,
    grpc.StatusCode.UNAUTHENTICATED: ErrorCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED: ErrorCode.UNAUTHENTICATED,
}


@dataclass
class ClientStats:
    """Counters a caller (or a test) can read to see what the client did."""

    resolves: int = 0
    resolve_failures: int = 0
    stale_served: int = 0
    defaults_served: int = 0
    fallbacks_served: int = 0
    exposures_queued: int = 0
    exposures_deduplicated: int = 0
    exposures_sent: int = 0
    exposures_dropped: int = 0
    events_queued: int = 0
    events_sent: int = 0
    events_dropped: int = 0
    flush_failures: int = 0


class _LRU:
    """A bounded mapping that forgets the least recently written entry first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any) -> Any:
        return self._data.get(key)

    def put(self, key: Any, value: Any) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        if len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def mark_unless_recent(self, key: Any, now_ns: int, window_ns: float) -> bool:
        """Record `key` at `now_ns` and return True, unless it was recorded less than `window_ns`
        ago (then False, and the first time stays: the window runs from the first sighting)."""
        data = self._data
        seen = data.get(key)
        if seen is not None:
            if now_ns - seen < window_ns:
                return False
            data.move_to_end(key)
        data[key] = now_ns
        if len(data) > self.capacity:
            data.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._data)


class ExposureQueue:
    """Exposures waiting to be sent: deduplicated, grouped per resolve token, bounded."""

    def __init__(self, options: ClientOptions, stats: ClientStats) -> None:
        self._options = options
        self._stats = stats
        self._lock = threading.Lock()
        self._seen = _LRU(options.exposure_dedup_entries)
        # resolve token -> [(flag, apply time ns)]; dict keeps insertion order for oldest-first drops.
        self._by_token: OrderedDict[bytes, list[tuple[str, int]]] = OrderedDict()
        # Local exposures as (flag, unit, variant, rule, assignment id, resolve id, apply time ns).
        self._local: deque[tuple[str, str, str, str, str, str, int]] = deque()
        self._count = 0
        self._window_ns = options.exposure_dedup_seconds * 1e9

    def __len__(self) -> int:
        return self._count

    def add(self, result: FlagResult, now_ns: int | None = None) -> bool:
        """Queue the exposure of `result`; False when it was a duplicate or needs no exposure.

        Only a tuple is queued: the protobuf records are built when a batch is drained, on the
        background sender, so a local resolve's exposure costs the request path ~1-2 µs.
        """
        if not result.should_apply or result.variant is None:
            return False
        now_ns = time.time_ns() if now_ns is None else now_ns
        key = (result.unit, result.flag, result.variant)
        with self._lock:
            if not self._seen.mark_unless_recent(key, now_ns, self._window_ns):
                self._stats.exposures_deduplicated += 1
                return False
            if result.local:
                self._local.append((result.flag, result.unit, result.variant, result.rule, result.assignment_id,
                                    result.resolve_id, now_ns))
            else:
                self._by_token.setdefault(result.resolve_token, []).append((f"flags/{result.flag}", now_ns))
            self._count += 1
            self._stats.exposures_queued += 1
            if self._count > self._options.max_buffered:
                self._trim()
        return True

    def _trim(self) -> None:
        while self._count > self._options.max_buffered:
            if self._by_token:
                token, flags = next(iter(self._by_token.items()))
                flags.pop(0)
                if not flags:
                    del self._by_token[token]
            else:
                self._local.popleft()
            self._count -= 1
            self._stats.exposures_dropped += 1

    def drain(self, client_secret: str) -> list[apb.ApplyFlagsRequest]:
        """Take everything queued as ApplyFlags requests (send_time is set when sent)."""
        with self._lock:
            requests = [
                apb.ApplyFlagsRequest(
                    client_secret=client_secret, resolve_token=token, sdk=SDK_NAME,
                    flags=[apb.AppliedFlag(flag=flag, apply_time=timestamp_from_ns(ns)) for flag, ns in flags])
                for token, flags in self._by_token.items()]
            local_exposures = list(self._local)
            self._by_token.clear()
            self._local.clear()
            self._count = 0
        size = self._options.batch_size  # the records are built outside the lock
        for start in range(0, len(local_exposures), size):
            request = apb.ApplyFlagsRequest(client_secret=client_secret, sdk=SDK_NAME)
            add = request.local_assignments.add
            for flag, unit, variant, rule, assignment_id, resolve_id, apply_ns in local_exposures[start:start + size]:
                # In place: a record built apart and then copied in costs about twice as much.
                apply_time = add(flag=f"flags/{flag}", unit=unit, variant=variant, rule=rule,
                                 assignment_id=assignment_id, resolve_id=resolve_id).apply_time
                apply_time.seconds, apply_time.nanos = divmod(apply_ns, 1_000_000_000)
            requests.append(request)
        return requests

    def requeue(self, request: apb.ApplyFlagsRequest) -> None:
        """Put back a request whose send failed, to go out with the next flush."""
        with self._lock:
            if request.resolve_token:
                self._by_token.setdefault(request.resolve_token, []).extend(
                    (f.flag, f.apply_time.ToNanoseconds()) for f in request.flags)
                self._count += len(request.flags)
            self._local.extend((flag_name(la.flag), la.unit, la.variant, la.rule, la.assignment_id, la.resolve_id,
                                la.apply_time.ToNanoseconds()) for la in request.local_assignments)
            self._count += len(request.local_assignments)
            self._trim()

    @staticmethod
    def size_of(request: apb.ApplyFlagsRequest) -> int:
        return len(request.flags) + len(request.local_assignments)


class EventQueue:
    """Metric events waiting to be sent, each with its client-made id; bounded."""

    def __init__(self, options: ClientOptions, stats: ClientStats) -> None:
        self._options = options
        self._stats = stats
        self._lock = threading.Lock()
        self._events: deque[apb.Event] = deque()

    def __len__(self) -> int:
        return len(self._events)

    def add(self, event: apb.Event) -> None:
        with self._lock:
            self._events.append(event)
            self._stats.events_queued += 1
            while len(self._events) > self._options.max_buffered:
                self._events.popleft()
                self._stats.events_dropped += 1

    def drain(self, client_secret: str) -> list[apb.TrackEventsRequest]:
        """Take everything queued as TrackEvents requests of at most `batch_size` events."""
        with self._lock:
            events = list(self._events)
            self._events.clear()
        size = self._options.batch_size
        return [apb.TrackEventsRequest(client_secret=client_secret, events=events[i:i + size])
                for i in range(0, len(events), size)]

    def requeue(self, request: apb.TrackEventsRequest) -> None:
        """Put back a batch whose send failed; its ids are kept, so a partial success is not double counted."""
        with self._lock:
            self._events.extendleft(reversed(request.events))
            while len(self._events) > self._options.max_buffered:
                self._events.pop()
                self._stats.events_dropped += 1


# The metadata a server started with --client-secrets-file checks (twofold.guard.SECRET_METADATA_KEY).
SECRET_METADATA_KEY = "x-twofold-client-secret"


class ClockOffset:
    """A lower bound of (server clock - this client's clock), learnt from the servers' answers.

    Why: the server places a record in its own time as `record time + receive - send`. That
    offset is an upper bound (it includes the call's transit and queueing, which differ from
    call to call), so correcting exposures and events each with their own call's offset can
    put an event tracked right after a decision before the decision's exposure. Every
    ApplyFlags and TrackEvents answer carries `server_time`; `server_time - our receive time`
    is at most the true offset, and exposures are sent with it: the server stamps an exposure
    no later than it happened and an event no earlier, so the order holds by construction.
    The latest answer wins, so a client clock that steps is followed within one flush.
    """

    def __init__(self) -> None:
        self.micros: int | None = None
        self.probed = False

    def observe(self, response: Any, received_ns: int) -> None:
        """Learn from an answer received at `received_ns` (client clock, read after the answer)."""
        server_time = getattr(response, "server_time", None)
        if server_time is not None and response.HasField("server_time"):
            self.micros = server_time.seconds * 1_000_000 + server_time.nanos // 1000 - received_ns // 1000

    def probe_due(self, requests: Sequence[apb.ApplyFlagsRequest | apb.TrackEventsRequest]) -> bool:
        """Exposures are about to go out and no bound is known: ask once (an empty TrackEvents)."""
        if self.micros is not None or self.probed:
            return False
        if any(isinstance(r, apb.ApplyFlagsRequest) for r in requests):
            self.probed = True
            return True
        return False

    def probe_request(self, client_secret: str) -> apb.TrackEventsRequest:
        request = apb.TrackEventsRequest(client_secret=client_secret)
        request.send_time.CopyFrom(now_timestamp())
        return request


class ClientCore:
    """State and logic of one client, whichever flavour does its I/O."""

    def __init__(self, client_secret: str, options: ClientOptions) -> None:
        self.client_secret = client_secret
        # Sent with model-server calls: that server may require the same secrets (--client-secrets-file).
        self.model_metadata: tuple[tuple[str, str], ...] = (
            ((SECRET_METADATA_KEY, client_secret),) if client_secret else ())
        self.options = options
        self.stats = ClientStats()
        self.systems = SystemRegistry()
        self.exposures = ExposureQueue(options, self.stats)
        self.events = EventQueue(options, self.stats)
        self._last_known = _LRU(options.stale_cache_entries)
        self._last_known_lock = threading.Lock()
        self.clock = ClockOffset()
        # Local resolve ids: a random prefix per client and a counter, as the server makes its own;
        # uuid4() would read the OS's random source on every resolve (slow on some VMs).
        self._resolve_id_prefix = os.urandom(8).hex()
        self._resolve_counter = itertools.count()

    def new_resolve_id(self) -> str:
        """A unique id for one local resolve (32 hex digits, like the server's)."""
        return f"{self._resolve_id_prefix}{next(self._resolve_counter):016x}"

    # ---- resolve -------------------------------------------------------------------------

    @staticmethod
    def evaluation_context(unit: str, context: Mapping[str, Any] | None) -> dict[str, Any]:
        """The evaluation context sent to the resolver: the caller's attributes plus the unit."""
        merged = dict(context or {})
        merged[TARGETING_KEY] = unit
        return merged

    def resolve_request(self, flags: Sequence[str], unit: str, context: Mapping[str, Any] | None,
                        apply: bool = False) -> apb.ResolveFlagsRequest:
        """A ResolveFlags request; raises TypeError/ValueError when the context is not JSON-like."""
        return apb.ResolveFlagsRequest(
            flags=[f"flags/{flag_name(f)}" for f in flags],
            evaluation_context=python_to_struct(self.evaluation_context(unit, context)),
            client_secret=self.client_secret, apply=apply, sdk=SDK_NAME)

    def resolved(self, response: apb.ResolveFlagsResponse, unit: str, flags: Sequence[str],
                 defaults: Mapping[str, Any]) -> dict[str, FlagResult]:
        """Results from a ResolveFlags answer; flags the server did not return are FLAG_NOT_FOUND."""
        self.stats.resolves += 1
        out: dict[str, FlagResult] = {}
        for rf in response.resolved_flags:
            name = flag_name(rf.flag)
            out[name] = self._result(name, unit, rf.variant, struct_to_python(rf.value) if rf.HasField("value")
                                     else None, _REASONS.get(rf.reason, Reason.ERROR), rf.rule, rf.segment,
                                     rf.assignment_id, response.resolve_id, rf.should_apply,
                                     response.resolve_token, defaults.get(name), local=False)
        for flag in flags:
            name = flag_name(flag)
            if name not in out:
                out[name] = self.error_result(name, unit, defaults.get(name), ErrorCode.FLAG_NOT_FOUND,
                                              f"flag {name!r} was not resolved (unknown to this client?)")
        return out

    def _result(self, name: str, unit: str, variant: str, value: Any, reason: Reason, rule: str, segment: str,
                assignment_id: str, resolve_id: str, should_apply: bool, token: bytes, default: Any,
                local: bool) -> FlagResult:
        short_variant = variant_name(variant)
        error_code = error_message = None
        if reason is Reason.TARGETING_KEY_ERROR:
            error_code, error_message = ErrorCode.TARGETING_KEY_MISSING, "the unit is missing, not a string or too long"
        elif reason is Reason.ERROR:
            error_code, error_message = ErrorCode.GENERAL, "the resolver reported an error"
        if short_variant is None or value is None:
            value = default
            if reason is Reason.MATCH:
                # Matched a rule whose variant carries no value: the default is the experience.
                reason = Reason.DEFAULT
        result = FlagResult(flag=name, unit=unit, value=value, variant=short_variant, reason=reason,
                            error_code=error_code, error_message=error_message, rule=rule, segment=segment,
                            assignment_id=assignment_id, resolve_id=resolve_id, should_apply=should_apply,
                            local=local, resolve_token=token)
        # Kept to serve STALE when a later ResolveFlags fails. Local answers are not: they need no
        # server, and holding up to `stale_cache_entries` results for them cost every local
        # resolve more than the resolve itself (memory traffic and garbage-collector scans).
        if not local and result.variant is not None and reason is Reason.MATCH:
            with self._last_known_lock:
                self._last_known.put((name, unit), result)
        return result

    def error_result(self, name: str, unit: str, default: Any, code: ErrorCode, message: str,
                     outage: bool = False) -> FlagResult:
        """The caller's default, with the error that prevented a real answer.

        The reason is DEFAULT for an outage (nothing known, the default is the designed
        answer) and ERROR for a request the server refused (a bug to fix).
        """
        self.stats.defaults_served += 1
        return FlagResult(flag=name, unit=unit, value=default, variant=None,
                          reason=Reason.DEFAULT if outage else Reason.ERROR,
                          error_code=code, error_message=message)

    def resolve_failed(self, exc: BaseException, unit: str, flags: Sequence[str],
                       defaults: Mapping[str, Any]) -> dict[str, FlagResult]:
        """What to serve when ResolveFlags failed: the last known value (STALE), else the default.

        In strict mode raises TwofoldError instead.
        """
        self.stats.resolve_failures += 1
        code, message, outage = classify(exc, "assignment server")
        if self.options.strict:
            raise TwofoldError(code, message) from exc
        out: dict[str, FlagResult] = {}
        for flag in flags:
            name = flag_name(flag)
            last = None
            if outage:
                with self._last_known_lock:
                    last = self._last_known.get((name, unit))
            if last is not None:
                self.stats.stale_served += 1
                # The exposure is still worth logging: the value is used, and the server
                # deduplicates it if it saw it before.
                out[name] = FlagResult(
                    flag=name, unit=unit, value=last.value, variant=last.variant, reason=Reason.STALE,
                    error_code=code, error_message=message, rule=last.rule, segment=last.segment,
                    assignment_id=last.assignment_id, resolve_id=last.resolve_id,
                    should_apply=last.should_apply, local=last.local, resolve_token=last.resolve_token)
            else:
                out[name] = self.error_result(name, unit, defaults.get(name), code, message, outage)
        return out

    def local_results(self, resolved: Iterable[Mapping[str, Any]], unit: str, flags: Sequence[str],
                      defaults: Mapping[str, Any], resolve_id: str) -> dict[str, FlagResult]:
        """Results from the in-process resolver (dicts with the ResolvedFlag field names, reason as
        the protobuf enum number)."""
        self.stats.resolves += 1
        out: dict[str, FlagResult] = {}
        for rf in resolved:
            name = flag_name(str(rf["flag"]))
            out[name] = self._result(name, unit, str(rf.get("variant") or ""), rf.get("value"),
                                     _REASONS.get(rf["reason"], Reason.ERROR),
                                     str(rf.get("rule") or ""), str(rf.get("segment") or ""),
                                     str(rf.get("assignment_id") or ""), resolve_id,
                                     bool(rf.get("should_apply")), b"", defaults.get(name), local=True)
        for flag in flags:
            name = flag_name(flag)
            if name not in out:
                out[name] = self.error_result(name, unit, defaults.get(name), ErrorCode.FLAG_NOT_FOUND,
                                              f"flag {name!r} is not in the state this client may see")
        return out

    def resolve_planned(self, local: LocalState, flag: str, unit: str, context: Mapping[str, Any] | None,
                        default: Any, copy_value: bool = True) -> FlagResult | None:
        """One flag resolved in process with the state's plan for it: the same result as
        `resolve_locally`, without the per-call lookups. None when there is no plan (no state yet,
        a flag unknown to this client or needing the server) or the resolver raised: the general
        path then gives the answer (and reports the error).

        `copy_value=False` leaves the value shared with the state, for a caller that only reads
        it and hands out nothing mutable (the OpenFeature provider); never return such a result.
        """
        plan = local.plan(flag)
        if plan is None:
            return None
        ctx = dict(context) if context else {}
        ctx[TARGETING_KEY] = unit
        try:
            rf = plan.resolve_flag(plan.flag, ctx, plan.client)
        except Exception:
            return None
        self.stats.resolves += 1
        error_code = error_message = None
        if rf.reason == "RESOLVE_REASON_MATCH":  # str comparison: an Enum's hash runs in Python
            reason = Reason.MATCH
        else:
            reason = _LOCAL_REASONS[rf.reason]
            if reason is Reason.TARGETING_KEY_ERROR or reason is Reason.ERROR:
                error_code, error_message = _LOCAL_ERRORS[reason]
        value = rf.value
        short = None
        if rf.variant:
            short, copy = plan.variants[rf.variant]
        if short is None or value is None:
            short = None
            value = default
            if reason is Reason.MATCH:
                reason = Reason.DEFAULT  # a rule matched a variant that carries no value
        elif copy_value:
            value = copy(value)
        result = local_flag_result(plan.name, unit, value, short, reason, error_code, error_message, rf.rule,
                                   rf.segment, rf.assignment_id, self.new_resolve_id(), rf.should_apply)
        return result  # not kept for STALE: see `_result`

    def resolve_locally(self, local: LocalState, flags: Sequence[str], unit: str,
                        context: Mapping[str, Any] | None, defaults: Mapping[str, Any]) -> dict[str, FlagResult]:
        """Resolve in process from the streamed state; never raises unless strict."""
        names = [flag_name(f) for f in flags]
        try:
            resolved = local.resolve(names, self.evaluation_context(unit, context))
        except Exception as exc:
            unknown_client = type(exc).__name__ == "UnknownClientError"
            code = ErrorCode.UNAUTHENTICATED if unknown_client else ErrorCode.GENERAL
            message = f"local resolve failed: {type(exc).__name__}: {exc}"
            if self.options.strict:
                raise TwofoldError(code, message) from exc
            return {n: self.error_result(n, unit, defaults.get(n), code, message) for n in names}
        if resolved is None:
            message = "no state received from the assignment server yet"
            if self.options.strict:
                raise TwofoldError(ErrorCode.PROVIDER_NOT_READY, message)
            return {n: self.error_result(n, unit, defaults.get(n), ErrorCode.PROVIDER_NOT_READY, message, outage=True)
                    for n in names}
        return self.local_results(resolved, unit, names, defaults, self.new_resolve_id())

    # ---- exposure and events ---------------------------------------------------------------

    def use(self, result: FlagResult | None) -> bool:
        """The value of `result` is being used: queue its exposure (deduplicated). True when queued
        and a full batch of exposures is waiting (time to wake the sender)."""
        exposures = self.exposures
        return result is not None and exposures.add(result) and exposures._count >= self.options.batch_size

    def make_event(self, name: str, unit: str, value: float | None, properties: Mapping[str, Any] | None,
                   time_ns: int | None) -> apb.Event:
        """A metric event with a fresh client-made id; raises ValueError on bad input."""
        if not name or not isinstance(name, str):
            raise ValueError("an event needs a non-empty name")
        if not unit or not isinstance(unit, str):
            raise ValueError("an event needs the unit (a non-empty string)")
        event = apb.Event(event_id=uuid.uuid4().hex, unit=unit, name=name,
                          time=timestamp_from_ns(time_ns) if time_ns is not None else now_timestamp())
        if value is not None:
            value = float(value)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError("an event value must be a finite number")
            event.value = value
        if properties:
            event.properties.CopyFrom(python_to_struct(properties))
        return event

    def track(self, name: str, unit: str, value: float | None = None,
              properties: Mapping[str, Any] | None = None, time_ns: int | None = None) -> str:
        """Queue a metric event and return its id."""
        event = self.make_event(name, unit, value, properties, time_ns)
        self.events.add(event)
        return event.event_id

    def pending(self) -> int:
        """Exposures and events not sent yet."""
        return len(self.exposures) + len(self.events)

    def delivered(self, request: apb.ApplyFlagsRequest | apb.TrackEventsRequest, response: Any = None,
                  received_ns: int | None = None) -> None:
        """Count a request the server acknowledged; learn the clock offset from its answer."""
        if response is not None:
            self.clock.observe(response, time.time_ns() if received_ns is None else received_ns)
        if isinstance(request, apb.ApplyFlagsRequest):
            self.stats.exposures_sent += ExposureQueue.size_of(request)
        else:
            self.stats.events_sent += len(request.events)

    def delivery_failed(self, exc: BaseException, request: apb.ApplyFlagsRequest | apb.TrackEventsRequest) -> None:
        """A send failed: requeue it for an outage (ids make the resend safe); drop and log a refusal."""
        self.stats.flush_failures += 1
        _, message, outage = classify(exc, "assignment server")
        is_apply = isinstance(request, apb.ApplyFlagsRequest)
        if outage:
            if is_apply:
                self.exposures.requeue(request)  # type: ignore[arg-type]
            else:
                self.events.requeue(request)  # type: ignore[arg-type]
            return
        if is_apply:
            size = ExposureQueue.size_of(request)  # type: ignore[arg-type]
            self.stats.exposures_dropped += size
        else:
            size = len(request.events)  # type: ignore[union-attr]
            self.stats.events_dropped += size
        _log.error("assignment server refused %d %s, dropping them: %s", size,
                   "exposures" if is_apply else "events", message)

    def requeue_unconfirmed(self, requests: Sequence[apb.ApplyFlagsRequest | apb.TrackEventsRequest]) -> None:
        """Put back requests whose outcome is unknown (a send cancelled midway); ids dedup a resend."""
        for request in requests:
            if isinstance(request, apb.ApplyFlagsRequest):
                self.exposures.requeue(request)
            else:
                self.events.requeue(request)

    def drain_all(self) -> list[apb.ApplyFlagsRequest | apb.TrackEventsRequest]:
        """Everything queued as requests; stamp each with `stamp_send_time` as it is handed to gRPC."""
        return [*self.exposures.drain(self.client_secret), *self.events.drain(self.client_secret)]

    def stamp_send_time(self, request: apb.ApplyFlagsRequest | apb.TrackEventsRequest) -> None:
        """Set `send_time` to now, and on exposures the known lower bound of the clock offset.

        Stamped per request at the moment it is sent: receive - send is the upper bound events
        are corrected with, and a stamp taken early would only make it looser (later)."""
        request.send_time.CopyFrom(now_timestamp())
        if isinstance(request, apb.ApplyFlagsRequest) and self.clock.micros is not None:
            request.clock_offset_micros = self.clock.micros

    def should_flush_early(self) -> bool:
        return len(self.exposures) >= self.options.batch_size or len(self.events) >= self.options.batch_size


def classify(exc: BaseException, what: str) -> tuple[ErrorCode, str, bool]:
    """(error code, message, is it an outage) for an exception raised by a call to `what`."""
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        status = exc.code()
        details = exc.details() if hasattr(exc, "details") else ""
        message = f"{what}: {status.name}: {details}"
        if status in _OUTAGE_CODES:
            return _OUTAGE_CODES[status], message, True
        return _REQUEST_CODES.get(status, ErrorCode.GENERAL), message, False
    if isinstance(exc, TimeoutError):
        return ErrorCode.DEADLINE_EXCEEDED, f"{what}: timed out", True
    if isinstance(exc, (TypeError, ValueError)):
        return ErrorCode.INVALID_CONTEXT, f"invalid evaluation context: {exc}", False
    return ErrorCode.GENERAL, f"{what}: {type(exc).__name__}: {exc}", False


class ClientSurface:
    """The part of the public API that the sync and asyncio clients share word for word.

    Both keep a `ClientCore` in `_core` and, with local evaluation, a `LocalState` in `_local`.
    """

    _core: ClientCore
    _local: LocalState | None
    _closed: bool
    options: ClientOptions

    def _resolve_planned(self, flag: str, unit: str, context: Mapping[str, Any] | None, default: Any,
                         copy_value: bool = True) -> FlagResult | None:
        """The in-process fast path of `resolve` (see `ClientCore.resolve_planned`); None: take the
        general path."""
        local = self._local
        if local is None or self._closed:
            return None
        return self._core.resolve_planned(local, flag, unit, context, default, copy_value)

    def apply(self, result: FlagResult) -> None:
        raise NotImplementedError

    def _finish_decide(self, result: FlagResult, decision: Decision) -> Decision:
        """After the arm's system answered: count a fallback (raised when strict), log the exposure."""
        if decision.reason is Reason.FALLBACK:
            self._core.stats.fallbacks_served += 1
            if self.options.strict:
                raise TwofoldError(decision.error_code or ErrorCode.SYSTEM_FAILED,
                                   decision.error_message or "system failed")
        self.apply(result)
        return decision

    def _decide_failed(self, flag: str, unit: str, default: Any, exc: Exception) -> Decision:
        """decide() raised unexpectedly: re-raise when strict, else serve the default with the error."""
        if self.options.strict:
            raise exc
        _log.exception("decide(%s) failed unexpectedly; serving the default", flag)
        return Decision(flag=flag_name(flag), unit=unit, value=default, system=None, reason=Reason.ERROR,
                        error_code=ErrorCode.GENERAL, error_message=f"{type(exc).__name__}: {exc}")

    @property
    def stats(self) -> ClientStats:
        """Counters of what this client did (resolves, stale answers, exposures and events sent, ...)."""
        return self._core.stats

    @property
    def state_generation(self) -> int:
        """The state generation local evaluation resolves with (0 before the first snapshot)."""
        return self._local.generation if self._local else 0

    def register_system(self, name: str, fn: SystemFn) -> None:
        """Serve arms whose value names `name` with `fn(SystemCall)` (the asyncio client also
        awaits a coroutine function); see client_sdk.systems."""
        self._core.systems.register(name, fn)
