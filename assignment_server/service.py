"""The FlagResolverService: ResolveFlags, ApplyFlags, TrackEvents and WatchState over gRPC.

A thin layer over the resolver core: it converts protobuf to plain values, enforces client
secrets and limits (each bad input gets its own status code and the server keeps serving), and
turns resolutions into exposures (contract 2) written through the shared lake writer. A call
that writes is acknowledged only after the lake writer fsynced its records.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
from google.protobuf import struct_pb2, timestamp_pb2
from prometheus_client import Counter

from assignment_server.materializations import StickyStore
from assignment_server.state_source import Served, StateSource
from assignment_server.tokens import InvalidTokenError, TokenAssignment, TokenCodec, new_token
from protos.twofold.assignment.v1 import assignment_pb2 as pb
from protos.twofold.assignment.v1 import assignment_pb2_grpc as pb_grpc
from twofold import loop_metrics
from twofold.lake import LakeWriter
from twofold.resolver import (
    MAX_FLAGS_PER_RESOLVE,
    STATE_MEDIA_TYPE,
    Reason,
    ResolvedFlag,
    Resolver,
    TooManyFlagsError,
)
from twofold.resolver.state import Client
from twofold.resolver.verify import assignment_problem
from twofold.structs import struct_to_dict

log = logging.getLogger("twofold.assignment")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FlagResolverService"].full_name
MAX_EVENTS_PER_CALL = 10_000
MAX_APPLIES_PER_CALL = 10_000
MAX_ID_LENGTH = 256
WATCH_HEARTBEAT_SECONDS = 30.0
# Large batches hand the event loop back every this many records (~1 ms of work), so a 10,000-event
# call does not hold it for tens of milliseconds: other calls (refusals and probes included) are
# dispatched once per loop turn, and a long turn delays every one of them.
YIELD_EVERY = 500
# A resolve token older than this is refused by ApplyFlags: an exposure logged hours after the
# decision would land outside the analysis window it belongs to, and a leaked token stops working.
DEFAULT_TOKEN_MAX_AGE_SECONDS = 3600.0

RESOLVES = loop_metrics.counter("twofold_assignment_resolves", "Resolved flags.", ["flag", "variant", "reason"])
APPLIES = Counter("twofold_assignment_applies", "Exposures received.", ["result"])
EVENTS = Counter("twofold_assignment_events", "Metric events received.", ["result"])

_REASONS = {r: getattr(pb, r.value) for r in Reason}
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _micros(ts: timestamp_pb2.Timestamp) -> int:
    return ts.seconds * 1_000_000 + ts.nanos // 1000


def _now_timestamp() -> timestamp_pb2.Timestamp:
    """The server clock now, for the responses a client learns its clock offset from."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(time.time_ns())
    return stamp


def _exposure_id(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


class RecentIds:
    """Ids seen recently (two rotating sets): drops retried exposures/events before they are written.

    Readers deduplicate by id as well (contract 3); this keeps the lake from growing with
    retries and lets the response say how many were duplicates.
    """

    def __init__(self, capacity: int = 1_000_000) -> None:
        self.capacity = capacity
        self._current: set[str] = set()
        self._previous: set[str] = set()

    def __contains__(self, item: str) -> bool:
        return item in self._current or item in self._previous

    def add(self, item: str) -> None:
        if len(self._current) >= self.capacity:
            self._previous, self._current = self._current, set()
        self._current.add(item)

    def discard_all(self, items: Iterable[str]) -> None:
        for item in items:
            self._current.discard(item)
            self._previous.discard(item)


def add_to_server(servicer: FlagResolverServicer, server: Any) -> None:
    """Register the servicer (undecodable requests are answered INVALID_ARGUMENT by `twofold.guard`)."""
    pb_grpc.add_FlagResolverServiceServicer_to_server(servicer, server)


def non_finite_field(value: Any, path: str = "") -> str | None:
    """The path of the first NaN or infinite number in a context (a Struct holds doubles), or None.

    Targeting compares numbers as numbers and as their text; NaN equals nothing and `inf` would
    be compared as the string "inf", so such a value is refused rather than silently mismatched.
    """
    t = type(value)
    if t is float:
        return path if value - value != 0.0 else None  # NaN and ±inf: x - x is NaN
    if t is dict:
        for key, item in value.items():
            found = non_finite_field(item, f"{path}.{key}" if path else key)
            if found is not None:
                return found
    elif t is list:
        for i, item in enumerate(value):
            found = non_finite_field(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def _properties_json(properties: struct_pb2.Struct) -> str:
    """An event's properties as canonical JSON; "{}" without building it for the common empty case.

    Measured by bench/lake.py: the conversion cost 2.2 us per event, two thirds of the handler's
    per-event work, for events that mostly carry no properties.
    """
    if not properties.fields:
        return "{}"
    return json.dumps(struct_to_dict(properties), sort_keys=True, separators=(",", ":"))


def normalize_flag(name: str) -> str:
    return name if name.startswith("flags/") else f"flags/{name}"


class FlagResolverServicer(pb_grpc.FlagResolverServiceServicer):
    def __init__(self, source: StateSource, exposures: LakeWriter, events: LakeWriter, tokens: TokenCodec,
                 materializations: StickyStore | None,
                 token_max_age: float = DEFAULT_TOKEN_MAX_AGE_SECONDS) -> None:
        self.source = source
        self.token_max_age = token_max_age
        self.exposures = exposures
        self.events = events
        self.tokens = tokens
        self.materializations = materializations
        self._seen_exposures = RecentIds()
        self._seen_events = RecentIds()
        self._messages: dict[tuple, pb.ResolvedFlag] = {}
        self._resolver_cache: Resolver | None = None
        self._cache_generation = -1
        self._resolve_children: dict[tuple[str, str, str], Any] = {}
        self._snapshots: dict[tuple[int, str], bytes] = {}
        # Resolve ids: unique without a system call per resolve (random per process + counter).
        self._id_prefix = os.urandom(8).hex()
        self._id_counter = itertools.count()

    def remember_stored(self, exposure_ids: Iterable[str], event_ids: Iterable[str]) -> None:
        """Seed the duplicate filters with ids already in the lake (read back by the writers at start)."""
        for eid in exposure_ids:
            self._seen_exposures.add(eid)
        for eid in event_ids:
            self._seen_events.add(eid)

    # -- helpers --------------------------------------------------------------------------------

    def _served(self) -> Served:
        served = self.source.current
        assert served is not None
        return served

    async def _client(self, served: Served, secret: str, context: grpc.aio.ServicerContext) -> Client:
        if not secret:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "client_secret is required")
        client = served.state.clients.get(secret)
        if client is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown client secret")
        assert client is not None
        return client

    def _per_generation(self, served: Served) -> None:
        """Drop caches built for an older state (their values belong to it)."""
        if served.generation != self._cache_generation:
            self._messages = {}
            self._resolver_cache = Resolver(served.state)
            self._cache_generation = served.generation

    def _resolver(self, served: Served) -> Resolver:
        self._per_generation(served)
        assert self._resolver_cache is not None
        return self._resolver_cache

    def _message(self, served: Served, f: ResolvedFlag) -> pb.ResolvedFlag:
        """The protobuf of a result, built once per distinct result (values are large to rebuild)."""
        self._per_generation(served)
        key = (f.flag, f.variant, f.reason, f.should_apply, f.rule, f.segment, f.assignment_id)
        message = self._messages.get(key)
        if message is None:
            message = pb.ResolvedFlag(flag=f.flag, variant=f.variant, reason=_REASONS[f.reason],
                                      should_apply=f.should_apply, rule=f.rule, segment=f.segment,
                                      assignment_id=f.assignment_id)
            if f.value:
                message.value.update(f.value)
            if len(self._messages) >= 100_000:
                self._messages.clear()
            self._messages[key] = message
        return message

    def _count(self, flag: ResolvedFlag) -> None:
        key = (flag.flag, flag.variant, flag.reason.value)
        child = self._resolve_children.get(key)
        if child is None:
            child = self._resolve_children[key] = RESOLVES.labels(*key)
        child.inc()

    async def _durable_append(self, writer: LakeWriter, records: list[dict[str, Any]],
                              context: grpc.aio.ServicerContext) -> None:
        """Append and wait for the fsync; a lake failure is UNAVAILABLE (the client retries, ids dedup)."""
        try:
            await writer.append(records)
        except Exception as exc:
            log.error("lake write failed", extra={"fields": {"table": writer.table, "error": repr(exc)}})
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"could not store {writer.table} durably; retry")

    async def _write_exposures(self, records: list[dict[str, Any]],
                               context: grpc.aio.ServicerContext) -> tuple[int, int]:
        """Write records not seen before; (accepted, duplicates). Durable when this returns."""
        fresh, duplicates, batch_ids = [], 0, set()
        for r in records:
            eid = r["exposure_id"]
            if eid in self._seen_exposures or eid in batch_ids:
                duplicates += 1
            else:
                batch_ids.add(eid)
                fresh.append(r)
        if fresh:
            for r in fresh:
                self._seen_exposures.add(r["exposure_id"])
            try:
                await self._durable_append(self.exposures, fresh, context)
            except BaseException:
                self._seen_exposures.discard_all(batch_ids)  # not durable: a retry must be accepted
                raise
        APPLIES.labels("accepted").inc(len(fresh))
        APPLIES.labels("duplicate").inc(duplicates)
        return len(fresh), duplicates

    # -- ResolveFlags ---------------------------------------------------------------------------

    async def ResolveFlags(self, request: pb.ResolveFlagsRequest,
                           context: grpc.aio.ServicerContext) -> pb.ResolveFlagsResponse:
        if len(request.flags) > MAX_FLAGS_PER_RESOLVE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"at most {MAX_FLAGS_PER_RESOLVE} flags per request, got {len(request.flags)}")
        served = self._served()
        state = served.state
        client = await self._client(served, request.client_secret, context)
        names = [n if n.startswith("flags/") else f"flags/{n}" for n in request.flags]  # normalize_flag, inlined
        missing = [n for n in names if n not in state.flags or client.name not in state.flags[n].clients]
        if missing:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"unknown flag(s) for this client: {', '.join(sorted(set(missing))[:20])}")
        ctx = struct_to_dict(request.evaluation_context)
        bad = non_finite_field(ctx)
        if bad is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"evaluation_context.{bad} is not a finite number (NaN and infinity match nothing)")
        try:
            resolver = self._resolver(served)
            if self.materializations is None:
                resolution = resolver.resolve_request(names, ctx, request.client_secret)
            else:  # reads and writes stored assignments off the loop, within the call's deadline
                resolution = await self.materializations.resolve(resolver, names, ctx, request.client_secret,
                                                                 context.time_remaining())
        except TooManyFlagsError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        results = resolution.flags
        if len(results) < len(names):  # archived flags asked for by name are reported, not silently dropped
            returned = {f.flag for f in results}
            results = results + [ResolvedFlag(n, Reason.FLAG_ARCHIVED) for n in dict.fromkeys(names)
                                 if n not in returned]
        resolve_id = f"{self._id_prefix}{next(self._id_counter):016x}"
        response = pb.ResolveFlagsResponse(resolve_id=resolve_id)
        out = response.resolved_flags
        to_apply: dict[str, tuple[TokenAssignment, ...]] = {}
        for f in results:
            out.append(self._message(served, f))
            self._count(f)
            if f.should_apply:
                items = [TokenAssignment(ft.targeting_key, ft.rule, "", "", ft.assignment_id)
                         for ft in f.fallthrough_assignments]
                if f.reason == Reason.MATCH:
                    items.append(TokenAssignment(f.targeting_key, f.rule, f.segment, f.variant, f.assignment_id))
                to_apply[f.flag] = tuple(items)
        if request.apply:
            now = int(time.time() * 1_000_000)
            await self._write_exposures([
                self._exposure(resolve_id, flag, a, client.name, now)
                for flag, items in to_apply.items() for a in items], context)
        elif to_apply:
            response.resolve_token = self.tokens.seal(new_token(resolve_id, client.name, to_apply))
        return response

    @staticmethod
    def _exposure(resolve_id: str, flag: str, a: TokenAssignment, client: str, ts: int) -> dict[str, Any]:
        return {"exposure_id": _exposure_id(resolve_id, flag, a.rule, a.unit), "ts": ts, "unit": a.unit,
                "flag": flag, "rule": a.rule, "variant": a.variant, "assignment_id": a.assignment_id,
                "resolve_id": resolve_id, "client": client}

    # -- ApplyFlags -----------------------------------------------------------------------------

    async def ApplyFlags(self, request: pb.ApplyFlagsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ApplyFlagsResponse:
        receive = int(time.time() * 1_000_000)
        served = self._served()
        client = await self._client(served, request.client_secret, context)
        if len(request.flags) + len(request.local_assignments) > MAX_APPLIES_PER_CALL:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_APPLIES_PER_CALL} exposures per call")
        if (request.flags or request.local_assignments) and not request.HasField("send_time"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "send_time is required (clock skew correction)")
        # receive - send is an upper bound of (server clock - client clock): it includes the transit
        # and any queueing. Events are stamped with it (never earlier than they happened); exposures
        # with the client's lower bound when it sends one (never later than they happened), so an
        # event tracked after an exposure is never ordered before it, whatever each call's delay.
        offset = receive - _micros(request.send_time)
        if request.HasField("clock_offset_micros"):
            offset = min(offset, request.clock_offset_micros)

        def corrected(apply_time: timestamp_pb2.Timestamp) -> int:
            return min(receive, _micros(apply_time) + offset)

        records: list[dict[str, Any]] = []
        if request.flags:
            if not request.resolve_token:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "resolve_token is required to apply flags")
            try:
                token = self.tokens.open(request.resolve_token)
            except InvalidTokenError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            if token.client != client.name:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "resolve token belongs to another client")
            age = receive / 1_000_000 - token.issued_at
            if age > self.token_max_age:
                APPLIES.labels("expired_token").inc(len(request.flags))
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"resolve token expired: issued {age:.0f} s ago, tokens are valid for "
                                    f"{self.token_max_age:.0f} s (--token-max-age-seconds); resolve again")
            for applied in request.flags:
                name = normalize_flag(applied.flag)
                if name not in token.assignments:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"flag {name} was not resolved (or needs no apply) in this token")
                if not applied.HasField("apply_time"):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"apply_time is required for {name}")
                ts = corrected(applied.apply_time)
                records.extend(self._exposure(token.resolve_id, name, a, client.name, ts)
                               for a in token.assignments[name])
        state = served.state
        refused, refusal = 0, ""
        for n, la in enumerate(request.local_assignments):
            if n % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)
            name = normalize_flag(la.flag)
            flag = state.flags.get(name)
            problem = None
            if flag is None or client.name not in flag.clients:
                problem = f"unknown flag {name} for this client"
            elif not la.unit or len(la.unit) > MAX_ID_LENGTH:
                problem = f"local assignment of {name}: unit must be 1..{MAX_ID_LENGTH} characters"
            elif not la.resolve_id or len(la.resolve_id) > MAX_ID_LENGTH:
                problem = f"local assignment of {name}: resolve_id is required"
            elif la.variant and not ({la.variant, f"{name}/variants/{la.variant}"} & flag.variants.keys()):
                problem = f"local assignment of {name}: unknown variant {la.variant}"
            elif not la.HasField("apply_time"):
                problem = f"local assignment of {name}: apply_time is required"
            if problem:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
            variant = la.variant if (not la.variant or la.variant in flag.variants) else f"{name}/variants/{la.variant}"
            # Well-formed, but would this server have assigned it to this client? (trust nothing)
            wrong = assignment_problem(state, client, name, la.rule, la.unit, variant, la.assignment_id)
            if wrong is not None:
                refused += 1
                refusal = refusal or f"local assignment of {name} for unit {la.unit}: {wrong}"
                continue
            records.append(self._exposure(la.resolve_id, name, TokenAssignment(la.unit, la.rule, "", variant,
                                                                               la.assignment_id),
                                          client.name, corrected(la.apply_time)))
        if refused:
            APPLIES.labels("refused").inc(refused)
            log.warning("local assignments refused", extra={"fields": {
                "client": client.name, "refused": refused, "first": refusal}})
        accepted, duplicates = await self._write_exposures(records, context)
        return pb.ApplyFlagsResponse(accepted=accepted, duplicates=duplicates, refused=refused, refusal=refusal,
                                     server_time=_now_timestamp())

    # -- TrackEvents ----------------------------------------------------------------------------

    async def TrackEvents(self, request: pb.TrackEventsRequest,
                          context: grpc.aio.ServicerContext) -> pb.TrackEventsResponse:
        receive = int(time.time() * 1_000_000)
        served = self._served()
        await self._client(served, request.client_secret, context)
        if len(request.events) > MAX_EVENTS_PER_CALL:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"at most {MAX_EVENTS_PER_CALL} events per call, got {len(request.events)}")
        send = _micros(request.send_time) if request.HasField("send_time") else None
        records, batch_ids, duplicates = [], set(), 0
        for i, e in enumerate(request.events):
            if i % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)
            for field_name in ("event_id", "unit", "name"):
                text = getattr(e, field_name)
                if not text or len(text) > MAX_ID_LENGTH:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"event {i}: {field_name} must be 1..{MAX_ID_LENGTH} characters")
            if e.HasField("value") and (e.value != e.value or abs(e.value) == float("inf")):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"event {i}: value must be finite")
            if e.event_id in batch_ids:
                duplicates += 1
                continue
            batch_ids.add(e.event_id)
            if e.HasField("time"):
                ts = _micros(e.time) if send is None else min(receive, receive - (send - _micros(e.time)))
            else:
                ts = receive
            records.append({"event_id": e.event_id, "ts": ts, "unit": e.unit, "name": e.name,
                            "value": e.value if e.HasField("value") else None,
                            "properties": _properties_json(e.properties)})
        # Against ids already seen only now, with no await since: a concurrent retry of the same
        # batch (the loop above may yield) is then a duplicate, never written twice.
        seen = self._seen_events
        fresh = [r for r in records if r["event_id"] not in seen]
        duplicates += len(records) - len(fresh)
        records = fresh
        batch_ids = {r["event_id"] for r in records}
        if records:
            for eid in batch_ids:
                self._seen_events.add(eid)
            try:
                await self._durable_append(self.events, records, context)
            except BaseException:
                self._seen_events.discard_all(batch_ids)
                raise
        EVENTS.labels("accepted").inc(len(records))
        EVENTS.labels("duplicate").inc(duplicates)
        return pb.TrackEventsResponse(accepted=len(records), duplicates=duplicates, server_time=_now_timestamp())

    # -- WatchState -----------------------------------------------------------------------------

    def snapshot_bytes(self, served: Served, secret: str, client: Client) -> bytes:
        """The state a client may see: its flags and only its own credential (no other secrets)."""
        key = (served.generation, secret)
        cached = self._snapshots.get(key)
        if cached is not None:
            return cached
        if len(self._snapshots) > 256:
            self._snapshots.clear()
        doc = dict(served.state.source)
        flags = doc.get("flags") or {}
        if isinstance(flags, dict):
            doc["flags"] = {n: f for n, f in flags.items() if client.name in (f.get("clients") or [])}
        else:
            doc["flags"] = [f for f in flags if client.name in (f.get("clients") or [])]
        doc.pop("clientCredentials", None)
        doc["clients"] = {secret: {"client": {"name": client.name},
                                   "clientCredential": {"name": client.credential, "clientSecret": {"secret": secret},
                                                        "environments": sorted(client.environments)}}}
        data = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
        self._snapshots[key] = data
        return data

    def _snapshot(self, served: Served, secret: str, client: Client) -> pb.StateSnapshot:
        updated = timestamp_pb2.Timestamp()
        updated.FromNanoseconds(int(served.loaded_at * 1e9))
        return pb.StateSnapshot(generation=served.generation, format=STATE_MEDIA_TYPE,
                                state=self.snapshot_bytes(served, secret, client), updated_at=updated)

    async def WatchState(self, request: pb.WatchStateRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[pb.StateSnapshot]:
        served = self._served()
        client = await self._client(served, request.client_secret, context)
        if served.generation != request.known_generation:
            yield self._snapshot(served, request.client_secret, client)
        generation = served.generation
        while True:
            served = await self.source.wait_for_change(generation, WATCH_HEARTBEAT_SECONDS)
            if served.generation == generation:
                continue
            client_now = served.state.clients.get(request.client_secret)
            if client_now is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "client secret was revoked")
            assert client_now is not None
            generation = served.generation
            yield self._snapshot(served, request.client_secret, client_now)
