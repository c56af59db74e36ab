"""What every call of every Twofold server goes through before its handler runs.

Each method handler is wrapped once, when its servicer is registered (no per-call interceptor
coroutine), and the one wrapper does, in this order:

1. count the call (the go-grpc-prometheus metrics of `twofold.metrics`);
2. while the server drains after SIGTERM, answer UNAVAILABLE, so the client retries elsewhere
   instead of seeing CANCELLED when the server stops;
3. admission: beyond `max_concurrent_rpcs` calls in flight, answer RESOURCE_EXHAUSTED at once,
   before the request is even decoded. Health and reflection are exempt, so a busy server never
   fails its Kubernetes probes (that would restart a healthy pod and make the overload worse);
4. a call whose deadline passed while it waited to be dispatched is answered DEADLINE_EXCEEDED
   without running the handler (its client has given up; the work would be wasted);
5. when the server is configured with client secrets, the call must carry one in the
   `x-twofold-client-secret` metadata (UNAUTHENTICATED otherwise; health and reflection exempt);
6. the request bytes are decoded here, not by gRPC: bytes that are not the method's message are
   INVALID_ARGUMENT naming the message type (gRPC's own decoding answers UNKNOWN), for every
   service including health and reflection.

Why gRPC's own `maximum_concurrent_rpcs` is not used: it counts health and reflection like any
call, and it can only refuse a call that Python has already taken from gRPC core's queue of
received calls. The aio server takes one call per method per event-loop turn, so that queue is
where overload waits; refusing cheaply (no decoding, no handler) and early keeps each turn short.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc

from twofold.metrics import SERVER_HANDLED, SERVER_HANDLING_SECONDS, SERVER_STARTED, final_code, grpc_type

log = logging.getLogger("twofold.server")

SECRET_METADATA_KEY = "x-twofold-client-secret"
# Never limited, never asked for a secret: probes and tooling must work on a busy or locked server.
EXEMPT_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})

Behavior = Callable[..., Any]


class CallGuard:
    """The state the wrappers share: calls in flight, the drain switch, the accepted secrets."""

    def __init__(self, max_concurrent_rpcs: int | None = None,
                 secrets: Callable[[], frozenset[str]] | None = None) -> None:
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self.in_flight = 0
        # Calls that reached a handler wrapper (limited services only): the drain watches it.
        self.dispatched = 0
        self.draining = False
        self._secrets = secrets

    def authorized(self, context: grpc.aio.ServicerContext) -> bool:
        """True when no secrets are configured or the call carries one of them."""
        if self._secrets is None:
            return True
        allowed = self._secrets()
        for key, value in context.invocation_metadata() or ():
            if key == SECRET_METADATA_KEY:
                given = value.encode() if isinstance(value, str) else value
                return any(hmac.compare_digest(given, s.encode()) for s in allowed)
        return False

    def wrap(self, service: str, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` behind this guard (async behaviors; sync ones are returned unchanged)."""
        return _guarded(self, service, method, handler)


def _decoder(handler: grpc.RpcMethodHandler) -> tuple[Callable[[bytes], Any], str]:
    deserialize = handler.request_deserializer or (lambda data: data)
    owner = getattr(deserialize, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", None) or "request message"
    return deserialize, name


def _guarded(guard: CallGuard, service: str, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    kind = grpc_type(handler)
    labels = (kind, service, method)
    started = SERVER_STARTED.labels(*labels)
    seconds = SERVER_HANDLING_SECONDS.labels(*labels)
    handled: dict[str, Any] = {}
    exempt = service in EXEMPT_SERVICES
    deserialize, message_name = _decoder(handler)
    undecodable = f"request is not a valid {message_name} message"

    def done(context: grpc.aio.ServicerContext, error: BaseException | None, t0: float) -> None:
        seconds.observe(time.perf_counter() - t0)
        code = final_code(context, error)
        child = handled.get(code)
        if child is None:
            child = handled[code] = SERVER_HANDLED.labels(*labels, code)
        child.inc()

    # A response stream (WatchState) lives for minutes and mostly waits: it is refused at the
    # limit like any call but does not hold a slot, or a few watchers would starve every call.
    holds_slot = not handler.response_streaming

    busy = f"server busy: {guard.max_concurrent_rpcs} calls in flight (--max-concurrent-rpcs); retry with backoff"

    def refused(context: grpc.aio.ServicerContext) -> bool:
        """True when the call is refused (its status set); otherwise counted in flight if it holds a slot.

        A refusal sets the status and returns rather than aborting: no exception to raise and
        catch, so refusing costs less than any answer (it is what an overloaded server does most).
        """
        if exempt:
            return False
        guard.dispatched += 1
        if guard.draining:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details("server is shutting down; retry on another replica")
            return True
        limit = guard.max_concurrent_rpcs
        if limit is not None and guard.in_flight >= limit:
            context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            context.set_details(busy)
            return True
        if holds_slot:
            guard.in_flight += 1
        return False

    async def check(context: grpc.aio.ServicerContext) -> None:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                "the deadline passed before the call was dispatched")
        if not exempt and not guard.authorized(context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"a known client secret is required in the {SECRET_METADATA_KEY} metadata")

    async def decode(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return deserialize(data)
        except Exception:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, undecodable)

    async def decoded_stream(raw: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for data in raw:
            yield await decode(data, context)

    behavior: Behavior | None = (handler.unary_unary or handler.unary_stream
                                 or handler.stream_unary or handler.stream_stream)
    if behavior is None or not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
        return handler
    streaming_request = handler.request_streaming

    wrapped: Behavior
    if inspect.isasyncgenfunction(behavior):
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[misc]
            started.inc()
            t0 = time.perf_counter()
            error: BaseException | None = None
            counted = False
            try:
                if refused(context):
                    return
                counted = holds_slot and not exempt
                await check(context)
                request = decoded_stream(request, context) if streaming_request else await decode(request, context)
                async for item in behavior(request, context):
                    yield item
            except BaseException as exc:
                error = exc
                raise
            finally:
                if counted:
                    guard.in_flight -= 1
                done(context, error, t0)
    else:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started.inc()
            t0 = time.perf_counter()
            error: BaseException | None = None
            counted = False
            try:
                if refused(context):
                    return None
                counted = holds_slot and not exempt
                await check(context)
                request = decoded_stream(request, context) if streaming_request else await decode(request, context)
                return await behavior(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                if counted:
                    guard.in_flight -= 1
                done(context, error, t0)

    factory = {
        "unary": grpc.unary_unary_rpc_method_handler,
        "server_stream": grpc.unary_stream_rpc_method_handler,
        "client_stream": grpc.stream_unary_rpc_method_handler,
        "bidi_stream": grpc.stream_stream_rpc_method_handler,
    }[kind]
    # No request deserializer: the wrapper decodes, so undecodable bytes get a clear status.
    return factory(wrapped, request_deserializer=None, response_serializer=handler.response_serializer)


class _GuardedGenericHandler(grpc.GenericRpcHandler):
    """Wraps a generic handler, guarding each method handler once and caching it."""

    def __init__(self, guard: CallGuard, inner: grpc.GenericRpcHandler) -> None:
        self._guard = guard
        self._inner = inner
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        name: str = handler_call_details.method  # type: ignore[attr-defined]
        cached = self._cache.get(name)
        if cached is not None and cached[0] is handler:
            return cached[1]
        service, _, method = name.lstrip("/").partition("/")
        wrapped = self._guard.wrap(service, method, handler)
        self._cache[name] = (handler, wrapped)
        return wrapped


class GuardingRegistrar:
    """Stands in for the server when generated `add_*Servicer_to_server` functions run.

    The generated code registers handlers twice (a generic handler and, since grpcio 1.63,
    registered method handlers); both paths are wrapped so every call is guarded and counted
    whichever lookup gRPC uses. Any service registered through `twofold.server.start_server`
    gets this, with the generated registration function unchanged.
    """

    def __init__(self, server: grpc.aio.Server, guard: CallGuard) -> None:
        self._server = server
        self._guard = guard

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_GuardedGenericHandler(self._guard, h) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        wrapped = {m: self._guard.wrap(service, m, h) for m, h in handlers.items()}
        self._server.add_registered_method_handlers(service, wrapped)


async def wait_until_drained(guard: CallGuard, budget: float, quiet: float = 0.1, tick: float = 0.02) -> None:
    """Answer new calls UNAVAILABLE until none was dispatched for `quiet` s and none is in flight.

    Calls that gRPC core received but Python had not yet taken are dispatched (and answered)
    during this wait, so none is left for the server's stop to cancel. Quiet is measured in
    ticks of the running loop, so a loop that is busy does not count as quiet.
    """
    guard.draining = True
    loop = asyncio.get_running_loop()
    end = loop.time() + budget
    last, quiet_ticks = guard.dispatched, 0
    while loop.time() < end:
        await asyncio.sleep(tick)
        if guard.dispatched == last and guard.in_flight == 0:
            quiet_ticks += 1
            if quiet_ticks * tick >= quiet:
                return
        else:
            last, quiet_ticks = guard.dispatched, 0
