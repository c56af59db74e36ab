"""The asyncio client: the same core as the blocking client, with `grpc.aio` for the waits.

Channels and background tasks (exposure/event delivery, the state stream) start on first
use inside the caller's event loop, so the client may be built at import time. Call
`await client.close()` (or use `async with`) to flush; at interpreter exit, whatever is
still queued is delivered with a blocking channel, since no event loop runs by then.
"""

from __future__ import annotations

import asyncio
import atexit
import inspect
import logging
import time
import weakref
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any

import grpc

from client_sdk import systems
from client_sdk.channels import ChannelPool, aio_pool
from client_sdk.core import ClientCore, ClientSurface, flag_name
from client_sdk.errors import TwofoldError
from client_sdk.local import Backoff, LocalState, watch_request
from client_sdk.options import ClientOptions
from client_sdk.results import Decision, ErrorCode, FlagResult
from client_sdk.sync_client import deliver_blocking, make_options
from protos.twofold.assignment.v1 import assignment_pb2 as apb
from protos.twofold.assignment.v1 import assignment_pb2_grpc
from protos.twofold.model.v1 import model_pb2, model_pb2_grpc
from twofold import waiting

log = logging.getLogger("twofold.sdk")


class AsyncClient(ClientSurface):
    """A Twofold client for asyncio code; same API as `Client`, with coroutines."""

    def __init__(self, assignment: str | None = None, model: str | None = None, client_secret: str = "",
                 *, options: ClientOptions | None = None, **overrides: Any) -> None:
        self.options = make_options(options, overrides)
        if self.options.local_evaluation and not assignment:
            raise ValueError("local evaluation needs the assignment server's address (for its state stream)")
        self._core = ClientCore(client_secret, self.options)
        self._assignment_target = assignment
        self._model_target = model
        self._started = False
        self._closed = False
        self._assignment_pool: ChannelPool | None = None
        self._model_pool: ChannelPool | None = None
        self._resolvers: list[assignment_pb2_grpc.FlagResolverServiceStub] = []
        self._models: list[model_pb2_grpc.ModelServiceStub] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._wake: asyncio.Event | None = None
        self._state_loaded: asyncio.Event | None = None
        self._flush_lock: asyncio.Lock | None = None
        self._local = LocalState(client_secret) if self.options.local_evaluation else None
        if self.options.flush_at_exit:
            ref = weakref.ref(self)
            self._atexit = lambda: (c := ref()) is not None and c._flush_at_exit()
            atexit.register(self._atexit)

    # ---- public API ----------------------------------------------------------------------

    async def wait_for_state(self, within: float | None = None) -> bool:
        """Local evaluation: wait up to `within` seconds for the first snapshot; True when it arrived."""
        self._start()
        if self._local is None:
            return True
        assert self._state_loaded is not None
        await waiting.within(self._state_loaded.wait(),
                             self.options.deadlines.local_state if within is None else within)
        return self._local.ready

    async def resolve(self, flag: str, unit: str, context: Mapping[str, Any] | None = None, *,
                      default: Any = None) -> FlagResult:
        # A plan exists only once a state arrived, i.e. after the background tasks started.
        result = self._resolve_planned(flag, unit, context, default)
        if result is not None:
            return result
        name = flag_name(flag)
        return (await self.resolve_many([flag], unit, context, defaults={name: default}))[name]

    async def resolve_many(self, flags: Sequence[str], unit: str, context: Mapping[str, Any] | None = None, *,
                           defaults: Mapping[str, Any] | None = None) -> dict[str, FlagResult]:
        defaults = {flag_name(k): v for k, v in (defaults or {}).items()}
        if self._closed:
            return self._unusable("the client is closed", unit, flags, defaults)
        self._start()
        if self._local is not None:
            names = [flag_name(f) for f in flags]
            # Sticky experiments need the server's stored assignments: those go remote.
            remote = self._local.needs_server(names)
            local_names = [n for n in names if n not in remote]
            results = self._core.resolve_locally(self._local, local_names, unit, context, defaults) \
                if local_names else {}
            if remote:
                results.update(await self._resolve_remote(remote, unit, context, defaults))
            return results
        return await self._resolve_remote(flags, unit, context, defaults)

    async def _resolve_remote(self, flags: Sequence[str], unit: str, context: Mapping[str, Any] | None,
                              defaults: Mapping[str, Any]) -> dict[str, FlagResult]:
        """One ResolveFlags call; failures become STALE or default results (see ClientCore)."""
        if not self._resolvers:
            return self._unusable("no assignment server configured", unit, flags, defaults)
        try:
            request = self._core.resolve_request(flags, unit, context)
            stub = self._resolvers[self._assignment_pool.pick()]  # type: ignore[union-attr]
            response = await stub.ResolveFlags(request, timeout=self.options.deadlines.resolve)
        except (grpc.RpcError, TypeError, ValueError) as exc:
            return self._core.resolve_failed(exc, unit, flags, defaults)
        return self._core.resolved(response, unit, flags, defaults)

    def apply(self, result: FlagResult) -> None:
        """Log the exposure of `result` now that its value is used (batched, deduplicated)."""
        if self._core.use(result) and self._wake is not None:
            self._wake.set()

    async def decide(self, flag: str, unit: str, context: Mapping[str, Any] | None = None, *,
                     features: Any = None, candidates: Any = None, default: Any = None,
                     decision_id: str | None = None) -> Decision:
        """See `Client.decide`."""
        try:
            result = await self.resolve(flag, unit, context, default=default)
            p = systems.plan(result, self._core.systems, context or {}, features, candidates, default, decision_id)
            decision = p.decision if p.decision is not None else await self._serve(p)
            return self._finish_decide(result, decision)
        except Exception as exc:
            return self._decide_failed(flag, unit, default, exc)

    def track(self, event: str, unit: str, value: float | None = None, *,
              properties: Mapping[str, Any] | None = None, time_ns: int | None = None) -> str:
        """Queue a metric event (no await needed); returns its client-made id."""
        event_id = self._core.track(event, unit, value, properties, time_ns)
        self._start_if_in_loop()
        if self._wake is not None and self._core.should_flush_early():
            self._wake.set()
        return event_id

    async def list_models(self) -> list[model_pb2.ModelInfo]:
        self._start()
        if not self._models:
            raise TwofoldError(ErrorCode.GENERAL, "no model server configured")
        stub = self._models[self._model_pool.pick()]  # type: ignore[union-attr]
        response = await stub.ListModels(model_pb2.ListModelsRequest(), timeout=self.options.deadlines.model,
                                  metadata=self._core.model_metadata)
        return list(response.models)

    async def flush(self) -> bool:
        """Send every queued exposure and event now; True when nothing is left unsent."""
        self._start()
        assert self._flush_lock is not None
        async with self._flush_lock:
            await self._send_pending()
        return self._core.pending() == 0

    async def close(self) -> None:
        """Flush, stop the background tasks, close the channels. Idempotent."""
        if self._closed:
            return
        if self._core.pending():
            self._start()  # e.g. only track() was called so far: the channels must exist to flush
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            if self._started:
                assert self._flush_lock is not None
                async with self._flush_lock:
                    await self._send_pending()
        finally:
            for pool in (self._assignment_pool, self._model_pool):
                if pool is not None:
                    for channel in pool.channels:
                        await channel.close()
            if self.options.flush_at_exit:
                atexit.unregister(self._atexit)
        if self._core.pending():
            log.warning("twofold client closed with %d exposures/events unsent (server unreachable)",
                        self._core.pending())

    async def __aenter__(self) -> AsyncClient:
        self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- internals -----------------------------------------------------------------------

    def _start(self) -> None:
        """Create channels and background tasks in the running loop (first use only)."""
        if self._started:
            return
        self._started = True
        if self._assignment_target:
            self._assignment_pool = aio_pool(self._assignment_target, self.options)
            self._resolvers = [assignment_pb2_grpc.FlagResolverServiceStub(c) for c in self._assignment_pool.channels]
        if self._model_target:
            self._model_pool = aio_pool(self._model_target, self.options)
            self._models = [model_pb2_grpc.ModelServiceStub(c) for c in self._model_pool.channels]
        self._wake = asyncio.Event()
        self._state_loaded = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._tasks.append(asyncio.create_task(self._flush_loop(), name="twofold-sdk-flush"))
        if self._local is not None:
            self._tasks.append(asyncio.create_task(self._watch_loop(), name="twofold-sdk-state"))

    def _start_if_in_loop(self) -> None:
        """Start the background delivery from a plain method (track) when called inside a running loop."""
        if self._started or self._closed:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: delivered at close() or at interpreter exit
        self._start()

    def _unusable(self, message: str, unit: str, flags: Sequence[str],
                  defaults: Mapping[str, Any]) -> dict[str, FlagResult]:
        if self.options.strict:
            raise TwofoldError(ErrorCode.GENERAL, message)
        return {flag_name(f): self._core.error_result(flag_name(f), unit, defaults.get(flag_name(f)),
                                                      ErrorCode.GENERAL, message) for f in flags}

    async def _serve(self, p: systems.Plan) -> Decision:
        if p.custom is not None:
            try:
                answer = p.custom(p.call)  # type: ignore[arg-type]
                if inspect.isawaitable(answer):
                    async with asyncio.timeout(self.options.deadlines.model):  # see twofold.waiting
                        answer = await answer
                return systems.finish_custom(p, answer)
            except Exception as exc:
                return systems.failed_call(p, exc)
        if not self._models:
            return systems.failed(p, ErrorCode.SYSTEM_FAILED, "no model server configured")
        stub = self._models[self._model_pool.pick()]  # type: ignore[union-attr]
        try:
            response = await getattr(stub, p.method)(p.request, timeout=self.options.deadlines.model,
                                                          metadata=self._core.model_metadata)  # type: ignore[arg-type]
        except grpc.RpcError as exc:
            return systems.failed_call(p, exc)
        return systems.finish_model(p, response)

    async def _watch_loop(self) -> None:
        assert self._local is not None
        backoff = Backoff()
        while True:
            stub = self._resolvers[self._assignment_pool.pick()]  # type: ignore[union-attr]
            try:
                async for snapshot in stub.WatchState(watch_request(self._local)):
                    if self._local.load(snapshot):
                        backoff.reset()
                        self._state_loaded.set()  # type: ignore[union-attr]
                    else:
                        log.error("refused a state snapshot: %s", self._local.last_error)
            except grpc.RpcError as exc:
                log.debug("state stream interrupted: %s", exc)
            await asyncio.sleep(backoff.next())

    async def _flush_loop(self) -> None:
        assert self._wake is not None and self._flush_lock is not None
        # `not self._closed` as well as cancellation: close() must never wait on this loop forever.
        while not self._closed:
            await waiting.within(self._wake.wait(), self.options.flush_interval)
            self._wake.clear()
            try:
                async with self._flush_lock:
                    await self._send_pending()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background flush failed")

    async def _send_pending(self) -> None:
        """Send queued exposures and events concurrently; requeue what failed for a transient reason."""
        if not self._resolvers:
            return
        core = self._core
        requests = core.drain_all()
        if core.clock.probe_due(requests):
            stub = self._resolvers[self._assignment_pool.pick()]  # type: ignore[union-attr]
            try:
                probe = await stub.TrackEvents(core.clock.probe_request(core.client_secret),
                                               timeout=self.options.deadlines.track)
                core.clock.observe(probe, time.time_ns())
            except grpc.RpcError as exc:  # no bound yet: exposures fall back to the server's upper bound
                log.debug("clock probe failed: %s", exc)
            except asyncio.CancelledError:
                core.requeue_unconfirmed(requests)
                raise
        calls = []
        for request in requests:
            stub = self._resolvers[self._assignment_pool.pick()]  # type: ignore[union-attr]
            core.stamp_send_time(request)
            if isinstance(request, apb.ApplyFlagsRequest):
                calls.append(_received(stub.ApplyFlags(request, timeout=self.options.deadlines.apply)))
            else:
                calls.append(_received(stub.TrackEvents(request, timeout=self.options.deadlines.track)))
        try:
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
        except asyncio.CancelledError:
            # close() stopped the background loop mid-send: nothing here is known to be delivered,
            # so it goes back for close()'s final flush (the server drops a repeat by its id).
            core.requeue_unconfirmed(requests)
            raise
        for request, outcome in zip(requests, outcomes, strict=True):
            if isinstance(outcome, grpc.RpcError):
                core.delivery_failed(outcome, request)
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                response, received_ns = outcome
                core.delivered(request, response, received_ns)

    def _flush_at_exit(self) -> None:
        """Interpreter exit without `close()`: deliver what is queued over a blocking channel."""
        if self._closed or not self._assignment_target or not self._core.pending():
            return
        deliver_blocking(self._assignment_target, self._core)


async def _received(call: Awaitable[Any]) -> tuple[Any, int]:
    """The answer of `call` and the client clock right after it came (for the clock offset)."""
    response = await call
    return response, time.time_ns()
