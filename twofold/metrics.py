"""Standard gRPC server metrics (the go-grpc-prometheus names) and the /metrics endpoint.

Instead of a per-call `ServerInterceptor` (an extra coroutine and handler lookup on every
call), each method handler is wrapped once, when the servicer is registered; the wrapper
holds pre-bound metric children, so a call costs two counter increments and one histogram
observation, on `twofold.loop_metrics` values (plain numbers read at scrape time).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

from twofold import loop_metrics

# From 50 µs up: the whole point of the model and assignment servers is sub-millisecond work.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)

_LABELS = ("grpc_type", "grpc_service", "grpc_method")

SERVER_STARTED = loop_metrics.counter(
    "grpc_server_started", "RPCs started on the server.", _LABELS)
SERVER_HANDLED = loop_metrics.counter(
    "grpc_server_handled", "RPCs completed on the server, by status code.", (*_LABELS, "grpc_code"))
SERVER_HANDLING_SECONDS = loop_metrics.histogram(
    "grpc_server_handling_seconds", "Time from receiving a call to its completion on the server.",
    _LABELS, buckets=LATENCY_BUCKETS)

Behavior = Callable[..., Any]


def _grpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


def _final_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    """The status the client sees: an explicit code, else OK, UNKNOWN or CANCELLED."""
    code = context.code()
    if code is not None:
        # aio contexts may report the raw integer status.
        if isinstance(code, grpc.StatusCode):
            return code.name
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status.name
    if error is None:
        return "OK"
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    return "UNKNOWN"


def instrument_handler(service: str, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """Return `handler` with its behavior counted and timed (async behaviors only)."""
    kind = _grpc_type(handler)
    labels = (kind, service, method)
    started = SERVER_STARTED.labels(*labels)
    seconds = SERVER_HANDLING_SECONDS.labels(*labels)
    handled: dict[str, Any] = {}

    def done(context: grpc.aio.ServicerContext, error: BaseException | None, t0: float) -> None:
        seconds.observe(time.perf_counter() - t0)
        code = _final_code(context, error)
        child = handled.get(code)
        if child is None:
            child = handled[code] = SERVER_HANDLED.labels(*labels, code)
        child.inc()

    behavior: Behavior | None = (handler.unary_unary or handler.unary_stream
                                 or handler.stream_unary or handler.stream_stream)
    if behavior is None:
        return handler

    wrapped: Behavior
    if inspect.isasyncgenfunction(behavior):
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[misc]
            started.inc()
            t0 = time.perf_counter()
            error: BaseException | None = None
            try:
                async for item in behavior(request, context):
                    yield item
            except BaseException as exc:
                error = exc
                raise
            finally:
                done(context, error, t0)
    elif inspect.iscoroutinefunction(behavior):
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started.inc()
            t0 = time.perf_counter()
            error: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                done(context, error, t0)
    else:
        return handler

    factory = {
        "unary": grpc.unary_unary_rpc_method_handler,
        "server_stream": grpc.unary_stream_rpc_method_handler,
        "client_stream": grpc.stream_unary_rpc_method_handler,
        "bidi_stream": grpc.stream_stream_rpc_method_handler,
    }[kind]
    return factory(wrapped, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


class _InstrumentedGenericHandler(grpc.GenericRpcHandler):
    """Wraps a generic handler, instrumenting each method handler once and caching it."""

    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
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
        wrapped = instrument_handler(service, method, handler)
        self._cache[name] = (handler, wrapped)
        return wrapped


class InstrumentingRegistrar:
    """Stands in for the server when generated `add_*Servicer_to_server` functions run.

    The generated code registers handlers twice (a generic handler and, since grpcio 1.63,
    registered method handlers); both paths are wrapped so every call is counted whichever
    lookup gRPC uses.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_InstrumentedGenericHandler(h) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        wrapped = {m: instrument_handler(service, m, h) for m, h in handlers.items()}
        self._server.add_registered_method_handlers(service, wrapped)


def declare(counter: Any, *label_values: str) -> None:
    """Export `counter`'s series for these label values now, at 0, before anything is counted.

    Why: a labelled Prometheus counter has no series until its first increment, and a series
    born at 1 has no earlier sample, so `increase()` over it stays 0 and an alert on the first
    failure never fires. Declared when the label set is first known (a lake table opened, a
    model found in the repository, an experiment loaded), the series goes 0 -> 1 instead.
    """
    counter.labels(*label_values)


def serve_metrics(host: str, port: int, registry: CollectorRegistry = REGISTRY) -> tuple[Any, int]:
    """Start the Prometheus HTTP endpoint in a daemon thread; return (server, bound port)."""
    httpd, _thread = start_http_server(port, addr=host, registry=registry)
    return httpd, int(httpd.server_port)
