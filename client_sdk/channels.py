"""gRPC channels for the SDK: round-robin over replicas, retries for idempotent methods, a small pool.

A target may be one address (`127.0.0.1:50051`), a DNS name that resolves to every replica
(`dns:///assignment.twofold.svc.cluster.local:50051`, a Kubernetes headless Service), or a
static list (`ipv4:10.0.0.1:50051,10.0.0.2:50051`). The service config picks `round_robin`,
so each channel keeps a connection to every address and spreads calls over them, and drops an
address that stops answering. Several channels per target give several HTTP/2 connections
per replica: one connection is served by one server process, so a pool lets a
`--workers N` model server use all of its processes.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Sequence
from typing import Any

import grpc

from client_sdk.options import ClientOptions, RetryPolicy, TlsConfig

ASSIGNMENT_SERVICE = "twofold.assignment.v1.FlagResolverService"
MODEL_SERVICE = "twofold.model.v1.ModelService"

# Methods that are safe to send twice (see RetryPolicy for why each one is).
IDEMPOTENT_METHODS: tuple[tuple[str, str], ...] = (
    (ASSIGNMENT_SERVICE, "ResolveFlags"),
    (ASSIGNMENT_SERVICE, "ApplyFlags"),
    (ASSIGNMENT_SERVICE, "TrackEvents"),
    (MODEL_SERVICE, "Predict"),
    (MODEL_SERVICE, "Score"),
    (MODEL_SERVICE, "Decide"),
    (MODEL_SERVICE, "ListModels"),
)


def service_config(retry: RetryPolicy) -> str:
    """The JSON service config: round-robin balancing and a retry policy per idempotent method."""
    policy = {
        "maxAttempts": retry.max_attempts,
        "initialBackoff": f"{retry.initial_backoff:.3f}s",
        "maxBackoff": f"{retry.max_backoff:.3f}s",
        "backoffMultiplier": retry.multiplier,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if retry.max_attempts > 1:
        config["methodConfig"] = [{
            "name": [{"service": service, "method": method} for service, method in IDEMPOTENT_METHODS],
            "retryPolicy": policy,
        }]
    return json.dumps(config)


def channel_options(options: ClientOptions, index: int) -> list[tuple[str, int | str]]:
    """Channel arguments for pool member `index`."""
    opts: list[tuple[str, int | str]] = [
        ("grpc.service_config", service_config(options.retry)),
        # A DNS TXT record must not replace our retry policy.
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.enable_retries", 1),
        # Each pool member owns its connections instead of sharing the process-wide subchannels.
        ("grpc.use_local_subchannel_pool", 1),
        ("twofold.channel_index", index),
        # Keep idle connections warm; the servers accept pings every 10 s.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        # Reconnect quickly after a replica restarts.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ]
    if options.tls is not None and options.tls.server_name:
        opts.append(("grpc.ssl_target_name_override", options.tls.server_name))
    opts.extend(options.channel_options)
    return opts


def channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    """TLS (or mutual TLS with a client certificate) credentials from PEM files."""
    def read(path: object) -> bytes | None:
        return path.read_bytes() if path is not None else None  # type: ignore[attr-defined]

    return grpc.ssl_channel_credentials(
        root_certificates=read(tls.root_certificates),
        private_key=read(tls.private_key),
        certificate_chain=read(tls.certificate_chain),
    )


class ChannelPool:
    """A fixed set of channels to one target, handed out in turn (thread-safe)."""

    def __init__(self, channels: Sequence[Any]) -> None:
        if not channels:
            raise ValueError("a channel pool needs at least one channel")
        self.channels = list(channels)
        self._next = itertools.cycle(range(len(self.channels)))
        self._lock = threading.Lock()

    def pick(self) -> int:
        """The index of the channel for the next call."""
        if len(self.channels) == 1:
            return 0
        with self._lock:
            return next(self._next)


def sync_pool(target: str, options: ClientOptions) -> ChannelPool:
    """A pool of blocking `grpc.Channel`s."""
    made = []
    for index in range(options.channels):
        opts = channel_options(options, index)
        if options.tls is None:
            made.append(grpc.insecure_channel(target, options=opts))
        else:
            made.append(grpc.secure_channel(target, channel_credentials(options.tls), options=opts))
    return ChannelPool(made)


def aio_pool(target: str, options: ClientOptions) -> ChannelPool:
    """A pool of `grpc.aio.Channel`s (create inside the event loop that will use them)."""
    made = []
    for index in range(options.channels):
        opts = channel_options(options, index)
        if options.tls is None:
            made.append(grpc.aio.insecure_channel(target, options=opts))
        else:
            made.append(grpc.aio.secure_channel(target, channel_credentials(options.tls), options=opts))
    return ChannelPool(made)
