"""Standard gRPC server metrics (the go-grpc-prometheus names) and the /metrics endpoint.

Instead of a per-call `ServerInterceptor` (an extra coroutine and handler lookup on every
call), each method handler is wrapped once, when the servicer is registered (`twofold.guard`);
the wrapper holds pre-bound metric children, so a call costs two counter increments and one
histogram observation, on `twofold.loop_metrics` values (plain numbers read at scrape time).
"""

from __future__ import annotations

import asyncio
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


def grpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


def final_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
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
