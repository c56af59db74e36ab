"""Resolving flags against a `ResolverState`: the Confidence semantics, in order.

For each flag the client may see, rules are tried in order. A rule is skipped when disabled,
not enabled for any of the credential's environments, pointing at an unknown segment, or
needing a targeting key the context lacks. Otherwise its segment must match (targeting, then
the unit's allocation bucket in the segment's bitset), then the unit's arm bucket picks an
assignment: a variant (MATCH), the client default (MATCH without a variant) or *fallthrough*
(the unit is recorded as a fallthrough exposure and the next rule is tried). No assignment
means NO_SEGMENT_MATCH, served as the client's default value.

`should_apply` says whether the caller should log an exposure when it uses the value: for a
match, and for a non-match that passed through a fallthrough assignment (the unit was in an
experiment's population, so its exposure counts).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from twofold.resolver.bucketing import allocation_bucket, arm_bucket
from twofold.resolver.errors import (
    MaterializationUnsupportedError,
    TooManyFlagsError,
    UnknownClientError,
    UnrecognizedRuleError,
)
from twofold.resolver.materializations import MaterializationRecord, MaterializationStore
from twofold.resolver.state import Assignment, Client, Flag, ResolverState, Rule, Segment
from twofold.resolver.sticky import MaterializationCache, resolve_steps, run_sync

MAX_FLAGS_PER_RESOLVE = 1000
MAX_TARGETING_KEY_LENGTH = 100
TARGETING_KEY = "targeting_key"


class Reason(StrEnum):
    """Why a flag resolved as it did; the names of the `ResolveReason` protobuf enum."""

    MATCH = "RESOLVE_REASON_MATCH"
    NO_SEGMENT_MATCH = "RESOLVE_REASON_NO_SEGMENT_MATCH"
    FLAG_ARCHIVED = "RESOLVE_REASON_FLAG_ARCHIVED"
    TARGETING_KEY_ERROR = "RESOLVE_REASON_TARGETING_KEY_ERROR"
    ERROR = "RESOLVE_REASON_ERROR"


@dataclass(frozen=True, slots=True)
class FallthroughAssignment:
    rule: str
    assignment_id: str
    targeting_key: str
    targeting_key_selector: str


@dataclass(slots=True)
class ResolvedFlag:
    """One flag's result. `value` is shared with the state: treat it as read-only.

    (Not frozen: a frozen dataclass's __init__ costs about a microsecond more, on the hot path.)
    """

    flag: str
    reason: Reason
    variant: str = ""
    value: Mapping[str, Any] | None = None
    should_apply: bool = False
    rule: str = ""
    segment: str = ""
    assignment_id: str = ""
    targeting_key: str = ""
    targeting_key_selector: str = ""
    fallthrough_assignments: tuple[FallthroughAssignment, ...] = ()

    @property
    def variant_name(self) -> str:
        """The short variant name (`control` of `flags/x/variants/control`)."""
        return self.variant.rpartition("/")[2]


@dataclass
class Resolution:
    """Everything one resolve produced: the flags, the client, and sticky assignments to store."""

    flags: list[ResolvedFlag]
    client: Client
    materializations_to_write: list[MaterializationRecord] = field(default_factory=list)


def normalize_request(flag_names: Iterable[str], evaluation_context: Mapping[str, Any] | None,
                      ) -> tuple[list[str], dict]:
    """Distinct flag names in order, and the context as a dict (what `Resolver.resolve_pass` takes)."""
    if isinstance(flag_names, str):  # resolve("flags/x", ...) means one flag, not its characters
        flag_names = [flag_names]
    names = flag_names if type(flag_names) is list and len(flag_names) == 1 else list(dict.fromkeys(flag_names))
    ctx = evaluation_context if isinstance(evaluation_context, dict) else dict(evaluation_context or {})
    return names, ctx


class MaterializationLookup(Protocol):
    """What one resolve pass asks of stored assignments (answered without I/O by a StoreView)."""

    def contains(self, materialization: str, unit: str) -> bool: ...

    def variant(self, materialization: str, unit: str, rule: str) -> str | None: ...


class _TargetingKeyError(Exception):
    pass


class _Evaluation:
    """Per-resolve context handed to targeting predicates (segment references, materializations)."""

    __slots__ = ("resolver", "store")

    def __init__(self, resolver: Resolver, store: MaterializationLookup | None) -> None:
        self.resolver = resolver
        self.store = store

    def segment_match_by_name(self, name: str, ctx: dict, unit: str | None, visited: tuple) -> bool:
        segment = self.resolver.state.segments.get(name)
        if segment is None:
            return False
        return self.resolver._segment_match(segment, ctx, unit, self, visited)

    def unit_in_materialized_segment(self, name: str, unit: str) -> bool:
        bloom = self.resolver.state.bloom_filters.get(name)
        if bloom is not None:
            return bloom.might_contain(unit)
        if self.store is None:
            raise MaterializationUnsupportedError(name)
        return self.store.contains(name, unit)


class Resolver:
    """Resolves flags for one state. Stateless apart from the state: safe to share across threads."""

    def __init__(self, state: ResolverState, materializations: MaterializationStore | None = None) -> None:
        self.state = state
        self.materializations = materializations

    # -- public API ---------------------------------------------------------------------------

    def resolve(self, flag_names: Iterable[str], evaluation_context: Mapping[str, Any] | None,
                client_secret: str) -> list[ResolvedFlag]:
        """Resolve `flag_names` (all the client's flags when empty) and return their results."""
        return self.resolve_request(flag_names, evaluation_context, client_secret).flags

    def resolve_request(self, flag_names: Iterable[str], evaluation_context: Mapping[str, Any] | None,
                        client_secret: str, *, materializations: MaterializationStore | None = None,
                        cache: MaterializationCache | None = None) -> Resolution:
        """Resolve and also return the client and the sticky assignments this resolve made.

        Raises UnknownClientError for an unknown secret and TooManyFlagsError above
        MAX_FLAGS_PER_RESOLVE flags. With a store (`materializations`, else the resolver's own),
        stored assignments are read in batches and new ones written first-write-wins before
        returning; what is served is what the store holds (`twofold.resolver.sticky`).
        """
        store = materializations if materializations is not None else self.materializations
        names, ctx = normalize_request(flag_names, evaluation_context)
        if store is None or not self.needs_store(names):
            return self.resolve_pass(names, ctx, client_secret, None)
        return run_sync(resolve_steps(self, names, ctx, client_secret, cache), store)

    def needs_store(self, names: list[str]) -> bool:
        """Whether resolving `names` (empty: all flags) may touch stored assignments; when not,
        a single pass without a store gives the same result without the bookkeeping of store passes."""
        need = self.state.flags_needing_store
        return bool(need) and (not names or not need.isdisjoint(names))

    def resolve_pass(self, names: list[str], ctx: dict, client_secret: str,
                     lookup: MaterializationLookup | None) -> Resolution:
        """One pass over the flags with `lookup` answering stored-assignment questions; no I/O.

        `names` is a list of distinct flag names (empty: all the client's flags). Without a
        lookup, flags that need stored assignments resolve with reason ERROR.
        """
        state = self.state
        client = state.clients.get(client_secret)
        if client is None:
            raise UnknownClientError("client secret not found")
        client_name = client.name
        if names:
            all_flags = state.flags
            flags = [f for f in (all_flags.get(n) for n in names)
                     if f is not None and f.state == "ACTIVE" and client_name in f.clients]
        else:
            flags = [f for f in state.flags.values() if f.state == "ACTIVE" and client_name in f.clients]
        if len(flags) > MAX_FLAGS_PER_RESOLVE:
            raise TooManyFlagsError(
                f"at most {MAX_FLAGS_PER_RESOLVE} flags per resolve, this one would resolve {len(flags)}")
        ev = _Evaluation(self, lookup)
        to_write: list[MaterializationRecord] = []
        results = [self._resolve_flag(flag, ctx, client, ev, to_write) for flag in flags]
        return Resolution(results, client, to_write)

    def resolve_flag(self, flag: Flag, ctx: dict, client: Client) -> ResolvedFlag:
        """One flag, looked up by the caller: active, visible to `client`, needing no stored
        assignments (not in `state.flags_needing_store`); `ctx` a dict. No I/O.

        Gives exactly what `resolve_pass` gives for that flag, without the per-call lookups a
        caller that plans per flag once per state (the SDK's local evaluation) already did.
        """
        return self._resolve_flag(flag, ctx, client, self._without_store, [])

    @functools.cached_property
    def _without_store(self) -> _Evaluation:
        return _Evaluation(self, None)  # holds no per-call state: one serves every `resolve_flag`

    # -- internals ------------------------------------------------------------------------------

    def _resolve_flag(self, flag: Flag, ctx: dict, client: Client, ev: _Evaluation,
                      to_write: list[MaterializationRecord]) -> ResolvedFlag:
        if flag.state == "ARCHIVED":
            return ResolvedFlag(flag.name, Reason.FLAG_ARCHIVED)
        fallthroughs: list[FallthroughAssignment] = []
        try:
            result = self._match_rules(flag, ctx, client, ev, to_write, fallthroughs)
        except _TargetingKeyError:
            return ResolvedFlag(flag.name, Reason.TARGETING_KEY_ERROR, should_apply=bool(fallthroughs),
                                fallthrough_assignments=tuple(fallthroughs))
        except MaterializationUnsupportedError:
            return ResolvedFlag(flag.name, Reason.ERROR)
        if result is not None:
            return result
        return ResolvedFlag(flag.name, Reason.NO_SEGMENT_MATCH, should_apply=bool(fallthroughs),
                            fallthrough_assignments=tuple(fallthroughs))

    def _match_rules(self, flag: Flag, ctx: dict, client: Client, ev: _Evaluation,
                     to_write: list[MaterializationRecord],
                     fallthroughs: list[FallthroughAssignment]) -> ResolvedFlag | None:
        segments = self.state.segments
        units: dict[str, str | None] = {}  # targeting key per selector, read once per flag
        for rule in flag.rules:
            if not rule.enabled:
                continue
            if rule.environments and rule.environments.isdisjoint(client.environments):
                continue
            segment = segments.get(rule.segment)
            if segment is None:
                continue
            selector = rule.targeting_key_selector
            key = selector or TARGETING_KEY
            if key in units:
                unit = units[key]
            else:
                try:
                    unit = units[key] = _targeting_key(ctx, key)
                except _TargetingKeyError:
                    if selector or not rule.full_rollout:
                        raise
                    unit = None
            if unit is None and selector:
                continue
            if rule.assignments is None:
                continue
            try:
                matched = False
                if rule.read_materialization:
                    if unit is None:
                        continue
                    sticky = self._read_materialization(flag, rule, segment, ctx, unit, ev)
                    if isinstance(sticky, ResolvedFlag):
                        return sticky
                    if sticky is None:
                        continue
                    matched = sticky
                if not matched and not self._segment_match(segment, ctx, unit, ev, ()):
                    continue
            except UnrecognizedRuleError:
                continue

            assignment = self._pick_assignment(rule, unit)
            if assignment is None:
                continue
            if unit is not None and rule.write_materialization:
                to_write.append(MaterializationRecord(unit, rule.write_materialization, rule.name,
                                                      assignment.variant))
            kind = assignment.kind
            if kind == "fallthrough":
                fallthroughs.append(FallthroughAssignment(rule.name, assignment.assignment_id, unit or "",
                                                          selector))
                continue
            if kind == "clientDefault":
                return ResolvedFlag(flag.name, Reason.MATCH, "", {}, True, rule.name, segment.name,
                                    assignment.assignment_id, unit or "", selector, tuple(fallthroughs))
            return ResolvedFlag(flag.name, Reason.MATCH, assignment.variant, flag.variants[assignment.variant],
                                True, rule.name, segment.name, assignment.assignment_id, unit or "", selector,
                                tuple(fallthroughs))
        return None

    def _read_materialization(self, flag: Flag, rule: Rule, segment: Segment, ctx: dict, unit: str,
                              ev: _Evaluation) -> ResolvedFlag | bool | None:
        """The rule's sticky path: a result, True (matched, bucket normally), False, or None (skip rule)."""
        store = ev.store
        if store is None:
            raise MaterializationUnsupportedError(rule.read_materialization)
        if not store.contains(rule.read_materialization, unit):
            return None if rule.materialization_must_match else False
        if rule.segment_targeting_can_be_ignored:
            matched = True
        else:
            matched = segment.targeting(ctx, unit, ev, ())
        if not matched:
            return False
        stored = store.variant(rule.read_materialization, unit, rule.name)
        if stored:
            assignment = self._sticky_assignment(rule, segment, stored, unit)
            if assignment is not None:
                return ResolvedFlag(flag.name, Reason.MATCH, assignment.variant, flag.variants[assignment.variant],
                                    True, rule.name, segment.name, assignment.assignment_id, unit,
                                    rule.targeting_key_selector)
        return True

    @staticmethod
    def _sticky_assignment(rule: Rule, segment: Segment, variant: str, unit: str) -> Assignment | None:
        """The assignment giving the stored variant; among several, the one the unit's bucket is in."""
        candidates = [a for a in rule.assignments or () if a.kind == "variant" and a.variant == variant]
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        b = arm_bucket(segment.name, unit, rule.bucket_count)
        for a in candidates:
            for lower, upper in a.ranges:
                if lower <= b < upper:
                    return a
        return None

    @staticmethod
    def _pick_assignment(rule: Rule, unit: str | None) -> Assignment | None:
        assignments = rule.assignments or ()
        if rule.full_rollout:
            return assignments[0]
        if unit is None:
            return None
        b = arm_bucket(rule.segment, unit, rule.bucket_count)
        for a in assignments:
            for lower, upper in a.ranges:
                if lower <= b < upper:
                    return a
        return None

    def _segment_match(self, segment: Segment, ctx: dict, unit: str | None, ev: _Evaluation,
                       visited: tuple) -> bool:
        if segment.recursive:
            if segment.name in visited:
                return False
            visited = (*visited, segment.name)
        if not segment.targeting(ctx, unit, ev, visited):
            return False
        bitset = segment.bitset
        if bitset is None:
            return True
        if unit is None:
            return bitset.full
        b = allocation_bucket(self.state.salt, unit)
        bits = bitset.bits
        byte = b >> 3
        return byte < len(bits) and bool((bits[byte] >> (b & 7)) & 1)


def _targeting_key(ctx: dict, selector: str) -> str | None:
    """The unit from the context: a string, or an integral number; None when absent or null."""
    if "." in selector:
        value: Any = ctx
        for part in selector.split("."):
            value = value.get(part) if type(value) is dict else None
    else:
        value = ctx.get(selector)
    if value is None:
        return None
    t = type(value)
    if t is str:
        unit = value
    elif (t is int or t is float) and value == value and abs(value) != float("inf") and value == int(value):
        unit = str(int(value))
    else:
        raise _TargetingKeyError(selector)
    # Java's String.length(): UTF-16 code units.
    if len(unit) > MAX_TARGETING_KEY_LENGTH and len(unit.encode("utf-16-le")) // 2 > MAX_TARGETING_KEY_LENGTH:
        raise _TargetingKeyError(selector)
    return unit

