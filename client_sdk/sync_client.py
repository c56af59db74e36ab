"""The blocking client: resolve, decide, track, with background exposure and event delivery.

Thread-safe: one client per process serves every request thread. Network waits use gRPC's
blocking stubs with a deadline on every call; exposures and events go out from one
background thread (batched, and flushed on `close()` and at interpreter exit).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc

from client_sdk import systems
from client_sdk.channels import ChannelPool, sync_pool
from client_sdk.core import ClientCore, ClientSurface, flag_name
from client_sdk.errors import TwofoldError
from client_sdk.local import Backoff, LocalState, watch_request
from client_sdk.options import ClientOptions
from client_sdk.results import Decision, ErrorCode, FlagResult
from protos.twofold.assignment.v1 import assignment_pb2 as apb
from protos.twofold.assignment.v1 import assignment_pb2_grpc
from protos.twofold.model.v1 import model_pb2, model_pb2_grpc

log = logging.getLogger("twofold.sdk")


def make_options(options: ClientOptions | None, overrides: Mapping[str, Any]) -> ClientOptions:
    """`options` with keyword overrides applied (e.g. `Client(..., strict=True)`)."""
    base = options or ClientOptions()
    return dataclasses.replace(base, **overrides) if overrides else base


class Client(ClientSurface):
    """A Twofold client for blocking code.

    >>> client = Client(assignment="dns:///assignment:50051", model="dns:///model:50052",
    ...                 client_secret="backend-secret")
    >>> decision = client.decide("home-ranking", unit="user-42", context={"country": "SE"},
    ...                          features=user_vector, candidates=item_matrix)
    >>> client.track("purchase", unit="user-42", value=12.5)
    """

    def __init__(self, assignment: str | None = None, model: str | None = None, client_secret: str = "",
                 *, options: ClientOptions | None = None, **overrides: Any) -> None:
        self.options = make_options(options, overrides)
        if self.options.local_evaluation and not assignment:
            raise ValueError("local evaluation needs the assignment server's address (for its state stream)")
        self._core = ClientCore(client_secret, self.options)
        self._closed = False
        self._close_lock = threading.Lock()
        self._assignment_pool: ChannelPool | None = None
        self._resolvers: list[assignment_pb2_grpc.FlagResolverServiceStub] = []
        self._models: list[model_pb2_grpc.ModelServiceStub] = []
        self._model_pool: ChannelPool | None = None
        if assignment:
            self._assignment_pool = sync_pool(assignment, self.options)
            self._resolvers = [assignment_pb2_grpc.FlagResolverServiceStub(c) for c in self._assignment_pool.channels]
        if model:
            self._model_pool = sync_pool(model, self.options)
            self._models = [model_pb2_grpc.ModelServiceStub(c) for c in self._model_pool.channels]
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._flush_lock = threading.Lock()
        self._flusher = threading.Thread(target=self._flush_loop, name="twofold-sdk-flush", daemon=True)
        self._flusher.start()
        self._local: LocalState | None = None
        self._watch_call: Any = None
        self._watcher: threading.Thread | None = None
        if self.options.local_evaluation:
            self._local = LocalState(client_secret)
            self._watcher = threading.Thread(target=self._watch_loop, name="twofold-sdk-state", daemon=True)
            self._watcher.start()
        if self.options.flush_at_exit:
            ref = weakref.ref(self)
            self._atexit = lambda: (c := ref()) is not None and c.close()
            atexit.register(self._atexit)

    # ---- public API ----------------------------------------------------------------------

    def on_state_change(self, listener: Callable[[int], None]) -> None:
        """Local evaluation: call `listener(generation)` whenever a new flag state is swapped in."""
        if self._local is not None:
            self._local.listeners.append(listener)

    def wait_for_state(self, timeout: float | None = None) -> bool:
        """Local evaluation: wait until the first state snapshot arrived; True when it did."""
        if self._local is None:
            return True
        return self._local.wait_ready(self.options.deadlines.local_state if timeout is None else timeout)

    def resolve(self, flag: str, unit: str, context: Mapping[str, Any] | None = None, *,
                default: Any = None) -> FlagResult:
        """Resolve one flag for `unit` without logging an exposure (see `apply`)."""
        result = self._resolve_planned(flag, unit, context, default)
        if result is not None:
            return result
        name = flag_name(flag)
        return self.resolve_many([flag], unit, context, defaults={name: default})[name]

    def resolve_many(self, flags: Sequence[str], unit: str, context: Mapping[str, Any] | None = None, *,
                     defaults: Mapping[str, Any] | None = None) -> dict[str, FlagResult]:
        """Resolve several flags for `unit` in one call; keyed by short flag name."""
        defaults = {flag_name(k): v for k, v in (defaults or {}).items()}
        if self._closed:
            return self._unusable("the client is closed", unit, flags, defaults)
        if self._local is not None:
            names = [flag_name(f) for f in flags]
            # Sticky experiments need the server's stored assignments: those go remote.
            remote = self._local.needs_server(names)
            local_names = [n for n in names if n not in remote]
            results = self._core.resolve_locally(self._local, local_names, unit, context, defaults) \
                if local_names else {}
            if remote:
                results.update(self._resolve_remote(remote, unit, context, defaults))
            return results
        return self._resolve_remote(flags, unit, context, defaults)

    def _resolve_remote(self, flags: Sequence[str], unit: str, context: Mapping[str, Any] | None,
                        defaults: Mapping[str, Any]) -> dict[str, FlagResult]:
        """One ResolveFlags call; failures become STALE or default results (see ClientCore)."""
        if not self._resolvers:
            return self._unusable("no assignment server configured", unit, flags, defaults)
        try:
            request = self._core.resolve_request(flags, unit, context)
            stub = self._resolvers[self._assignment_pool.pick()]  # type: ignore[union-attr]
            response = stub.ResolveFlags(request, timeout=self.options.deadlines.resolve)
        except (grpc.RpcError, TypeError, ValueError) as exc:
            return self._core.resolve_failed(exc, unit, flags, defaults)
        return self._core.resolved(response, unit, flags, defaults)

    def apply(self, result: FlagResult) -> None:
        """Log the exposure of `result` now that its value is used (batched, deduplicated)."""
        if self._core.use(result):
            self._wake.set()

    def decide(self, flag: str, unit: str, context: Mapping[str, Any] | None = None, *,
               features: Any = None, candidates: Any = None, default: Any = None,
               decision_id: str | None = None) -> Decision:
        """Resolve `flag` for `unit`, serve it with the system its arm names, log the exposure.

        `features`: the unit's feature row (sequence, numpy array or name->value mapping);
        `candidates`: a matrix of candidate rows to rank. `default` is served when the unit
        has no assignment, and is the fallback when the arm's system fails. `decision_id` (bandit
        arms, optional) makes a decision reproducible: the same id gives the same arm. Never raises
        unless the client is strict: a failure is in the Decision's reason and error.
        """
        try:
            result = self.resolve(flag, unit, context, default=default)
            p = systems.plan(result, self._core.systems, context or {}, features, candidates, default, decision_id)
            decision = p.decision if p.decision is not None else self._serve(p)
            return self._finish_decide(result, decision)
        except Exception as exc:
            return self._decide_failed(flag, unit, default, exc)

    def track(self, event: str, unit: str, value: float | None = None, *,
              properties: Mapping[str, Any] | None = None, time_ns: int | None = None) -> str:
        """Queue a metric event for `unit`; returns its client-made id (retries never double count)."""
        event_id = self._core.track(event, unit, value, properties, time_ns)
        if self._core.should_flush_early():
            self._wake.set()
        return event_id

    def list_models(self) -> list[model_pb2.ModelInfo]:
        """The model server's models and versions (raises grpc.RpcError when unreachable)."""
        if not self._models:
            raise TwofoldError(ErrorCode.GENERAL, "no model server configured")
        stub = self._models[self._model_pool.pick()]  # type: ignore[union-attr]
        return list(stub.ListModels(model_pb2.ListModelsRequest(), timeout=self.options.deadlines.model,
                                  metadata=self._core.model_metadata).models)

    def flush(self, timeout: float | None = None) -> bool:
        """Send every queued exposure and event now; True when nothing is left unsent."""
        with self._flush_lock:
            self._send_pending()
        return self._core.pending() == 0

    def close(self) -> None:
        """Flush what is queued, stop the background threads, close the channels. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._wake.set()
        self._flusher.join(timeout=10)
        if self._watch_call is not None:
            self._watch_call.cancel()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        try:
            self.flush()
        finally:
            for pool in (self._assignment_pool, self._model_pool):
                if pool is not None:
                    for channel in pool.channels:
                        channel.close()
            if self.options.flush_at_exit:
                atexit.unregister(self._atexit)
        if self._core.pending():
            log.warning("twofold client closed with %d exposures/events unsent (server unreachable)",
                        self._core.pending())

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals -----------------------------------------------------------------------

    def _serve(self, p: systems.Plan) -> Decision:
        if p.custom is not None:
            try:
                return systems.finish_custom(p, p.custom(p.call))  # type: ignore[arg-type]
            except Exception as exc:
                return systems.failed_call(p, exc)
        if not self._models:
            return systems.failed(p, ErrorCode.SYSTEM_FAILED, "no model server configured")
        stub = self._models[self._model_pool.pick()]  # type: ignore[union-attr]
        try:
            response = getattr(stub, p.method)(p.request, timeout=self.options.deadlines.model,
                                                          metadata=self._core.model_metadata)  # type: ignore[arg-type]
        except grpc.RpcError as exc:
            return systems.failed_call(p, exc)
        return systems.finish_model(p, response)

    def _unusable(self, message: str, unit: str, flags: Sequence[str],
                  defaults: Mapping[str, Any]) -> dict[str, FlagResult]:
        """Defaults for every flag when the client cannot resolve at all (closed, not configured)."""
        if self.options.strict:
            raise TwofoldError(ErrorCode.GENERAL, message)
        return {flag_name(f): self._core.error_result(flag_name(f), unit, defaults.get(flag_name(f)),
                                                      ErrorCode.GENERAL, message) for f in flags}

    def _watch_loop(self) -> None:
        """Follow WatchState until closed, reconnecting with backoff; each snapshot is swapped in."""
        assert self._local is not None
        backoff = Backoff()
        while not self._stop.is_set():
            stub = self._resolvers[self._assignment_pool.pick()]  # type: ignore[union-attr]
            try:
                self._watch_call = stub.WatchState(watch_request(self._local))
                for snapshot in self._watch_call:
                    if self._local.load(snapshot):
                        backoff.reset()
                    else:
                        log.error("refused a state snapshot: %s", self._local.last_error)
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                log.debug("state stream interrupted: %s", exc)
            if self._stop.wait(backoff.next()):
                return

    def _flush_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.options.flush_interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                with self._flush_lock:
                    self._send_pending()
            except Exception:  # the flusher must survive anything
                log.exception("background flush failed")

    def _send_pending(self) -> None:
        if self._resolvers:
            send_blocking(self._resolvers, self._assignment_pool, self._core, self.options)  # type: ignore[arg-type]


def send_blocking(stubs: Sequence[assignment_pb2_grpc.FlagResolverServiceStub], pool: ChannelPool,
                  core: ClientCore, options: ClientOptions) -> None:
    """Send queued exposures and events concurrently; requeue what failed for a transient reason."""
    sent = []
    requests = core.drain_all()
    if core.clock.probe_due(requests):
        try:
            probe = stubs[pool.pick()].TrackEvents(core.clock.probe_request(core.client_secret),
                                                   timeout=options.deadlines.track)
            core.clock.observe(probe, time.time_ns())
        except grpc.RpcError as exc:  # no bound yet: exposures fall back to the server's upper bound
            log.debug("clock probe failed: %s", exc)
    for request in requests:
        stub = stubs[pool.pick()]
        core.stamp_send_time(request)
        if isinstance(request, apb.ApplyFlagsRequest):
            sent.append((stub.ApplyFlags.future(request, timeout=options.deadlines.apply), request))
        else:
            sent.append((stub.TrackEvents.future(request, timeout=options.deadlines.track), request))
    for future, request in sent:
        try:
            response = future.result()
        except grpc.RpcError as exc:
            core.delivery_failed(exc, request)
        else:
            core.delivered(request, response, time.time_ns())


def deliver_blocking(target: str, core: ClientCore) -> None:
    """Deliver whatever `core` has queued over short-lived blocking channels (used at exit)."""
    pool = sync_pool(target, core.options)
    try:
        stubs = [assignment_pb2_grpc.FlagResolverServiceStub(c) for c in pool.channels]
        send_blocking(stubs, pool, core, core.options)
    finally:
        for channel in pool.channels:
            channel.close()
