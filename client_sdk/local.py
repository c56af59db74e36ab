"""Local evaluation: resolve in process from the state the assignment server streams.

The assignment server publishes its compiled resolver state on `WatchState` (one snapshot
on subscribe, then one per generation). The client keeps the newest snapshot and resolves
with the assignment server's own pure resolver module, so a local resolve gives exactly
the answer the server would (same bucketing, same rules), with no call per resolve.
Exposures of local resolves travel as `local_assignments` in ApplyFlags.

Only the stream reading differs between the blocking and the asyncio client; holding the
state, resolving and the reconnect backoff are here, once.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from client_sdk.names import flag_name, variant_name
from protos.twofold.assignment.v1 import assignment_pb2 as apb

_log = logging.getLogger("twofold.sdk")


@dataclass(frozen=True, slots=True)
class FlagPlan:
    """What resolving one flag in process needs, worked out once per state generation.

    Why: a local resolve is a few microseconds of bucketing and rule matching; looking up the
    flag, the client and the sticky-flag set, and working out how to copy a variant's value,
    would cost as much again on every call. A plan exists only for a flag this client may
    see that needs no stored assignments; anything else takes the general path.
    """

    name: str  # short name, as results carry it
    flag: Any  # twofold.resolver.Flag
    client: Any  # twofold.resolver.Client of this client's secret
    resolve_flag: Callable[[Any, dict, Any], Any]  # the state's Resolver.resolve_flag
    # Full variant name -> (short name, how to make a private copy of its value).
    variants: dict[str, tuple[str | None, Callable[[Any], Any]]]

    def resolve(self, context: dict[str, Any]) -> Any:
        """The resolver's ResolvedFlag for this flag (its value shared with the state)."""
        return self.resolve_flag(self.flag, context, self.client)


@dataclass(frozen=True)
class LoadedState:
    """One state generation, compiled for the in-process resolver, with its flag plans."""

    generation: int
    format: str
    compiled: Any
    received_at: float
    # Keyed by both spellings of a flag ("x" and "flags/x"); replaced with the state.
    plans: dict[str, FlagPlan] = field(default_factory=dict)


class LocalState:
    """The newest streamed state; swapped by reference, so resolves never see a half-loaded one."""

    def __init__(self, client_secret: str) -> None:
        self.client_secret = client_secret
        self._current: LoadedState | None = None
        self._ready = threading.Event()
        self.load_failures = 0
        self.last_error: str | None = None
        # Called with the new generation after each successful swap (from the stream's thread or task).
        self.listeners: list[Callable[[int], None]] = []

    @property
    def generation(self) -> int:
        return self._current.generation if self._current else 0

    @property
    def ready(self) -> bool:
        return self._current is not None

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def load(self, snapshot: apb.StateSnapshot) -> bool:
        """Compile and swap in `snapshot`; a state that fails to load leaves the previous one serving."""
        # Imported here: only local evaluation needs the resolver (and its mmh3 dependency).
        from twofold.resolver import STATE_MEDIA_TYPE, Resolver, ResolverState

        try:
            if snapshot.format and snapshot.format != STATE_MEDIA_TYPE:
                raise ValueError(f"unsupported state format {snapshot.format!r} (this SDK reads {STATE_MEDIA_TYPE})")
            compiled = Resolver(ResolverState.from_json(snapshot.state))
        except Exception as exc:  # a bad snapshot must never take local evaluation down
            self.load_failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            return False
        self._current = LoadedState(snapshot.generation, snapshot.format, compiled, time.monotonic(),
                                    plan_flags(compiled, self.client_secret))
        self._ready.set()
        for listener in list(self.listeners):
            try:
                listener(snapshot.generation)
            except Exception:  # a listener must not break state updates
                _log.exception("state listener failed")
        return True

    def plan(self, flag: str) -> FlagPlan | None:
        """The current state's plan for `flag` (short or "flags/" name); None: take the general path."""
        current = self._current
        return current.plans.get(flag) if current is not None else None

    def needs_server(self, flags: Sequence[str]) -> list[str]:
        """The flags (short names) that only the server can resolve: sticky experiments, and
        targeting on materialized segments without a Bloom filter, read stored assignments
        (materializations), which live with the server (`ResolverState.flags_needing_store`)."""
        current = self._current
        if current is None:
            return []
        remote = current.compiled.state.flags_needing_store
        return [f for f in flags if f"flags/{f}" in remote]

    def resolve(self, flags: Sequence[str], context: Mapping[str, Any]) -> list[dict[str, Any]] | None:
        """Resolved flags as dicts (ResolvedFlag field names), or None before the first state.

        Raises the resolver's UnknownClientError for a secret the state does not know.
        """
        current = self._current
        if current is None:
            return None
        resolved = current.compiled.resolve([f"flags/{f}" for f in flags], dict(context), self.client_secret)
        return [{"flag": rf.flag, "variant": rf.variant, "value": private_copy(rf.value),
                 "reason": apb.ResolveReason.Value(str(rf.reason)), "rule": rf.rule, "segment": rf.segment,
                 "assignment_id": rf.assignment_id, "should_apply": rf.should_apply} for rf in resolved]


def plan_flags(resolver: Any, client_secret: str) -> dict[str, FlagPlan]:
    """A plan for every flag `client_secret` may see that resolves without stored assignments.

    Empty for a secret the state does not know: the general path reports that error.
    """
    state = resolver.state
    client = state.clients.get(client_secret)
    if client is None:
        return {}
    remote = state.flags_needing_store
    plans: dict[str, FlagPlan] = {}
    for qualified, flag in state.flags.items():
        if flag.state != "ACTIVE" or client.name not in flag.clients or qualified in remote:
            continue
        variants = {full: (variant_name(full), _copier(value)) for full, value in flag.variants.items()}
        plan = FlagPlan(flag_name(qualified), flag, client, resolver.resolve_flag, variants)
        plans[plan.name] = plans[f"flags/{plan.name}"] = plan
    return plans


_IMMUTABLE = (str, int, float, bool, type(None))


def _copier(value: Any) -> Callable[[Any], Any]:
    """How to copy a variant's value: a flat object of scalars needs only a shallow copy."""
    if isinstance(value, dict) and all(isinstance(v, _IMMUTABLE) for v in value.values()):
        return dict.copy
    return private_copy


def private_copy(value: Any) -> Any:
    """A private copy of a JSON value: the resolver shares its values with the state."""
    if isinstance(value, Mapping):
        return {k: private_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [private_copy(v) for v in value]
    return value


class Backoff:
    """Reconnect delays for the state stream: exponential with full jitter, reset on success."""

    def __init__(self, initial: float = 0.1, maximum: float = 5.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self._attempt = 0

    def reset(self) -> None:
        self._attempt = 0

    def next(self) -> float:
        delay = min(self.maximum, self.initial * (2 ** self._attempt))
        self._attempt += 1
        return random.uniform(delay / 2, delay)


def watch_request(state: LocalState) -> apb.WatchStateRequest:
    return apb.WatchStateRequest(client_secret=state.client_secret, known_generation=state.generation)
