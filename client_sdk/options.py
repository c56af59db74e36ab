"""Client settings: deadlines, retries, batching, channels, TLS.

The defaults suit a backend service calling servers in the same cluster: a resolve costs
well under a millisecond there (DESIGN.md, measured facts), so a deadline of a few hundred
milliseconds only trips on a real outage, and the request still gets an answer in time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Deadlines:
    """Seconds each call may take, retries included (gRPC counts retries inside the deadline)."""

    resolve: float = 0.3
    model: float = 0.3
    # Background calls: exposures and events are off the request path, so they can wait longer.
    apply: float = 2.0
    track: float = 2.0
    # How long `initialize()` waits for the first state snapshot in local-evaluation mode.
    local_state: float = 5.0

    def __post_init__(self) -> None:
        for name in ("resolve", "model", "apply", "track", "local_state"):
            if getattr(self, name) <= 0:
                raise ValueError(f"deadline {name} must be > 0 seconds")


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's own retry policy (service config), applied only to idempotent methods.

    ResolveFlags, Predict, Score and ListModels have no side effects; TrackEvents carries
    client-made event ids and ApplyFlags is deduplicated by the server; Decide carries a
    client-made decision id from which the policy's randomness derives, so a retried
    decision is the same decision and readers deduplicate its log row by id. The state
    stream is not retried by gRPC; the local evaluator reconnects it with its own backoff.
    Only UNAVAILABLE is retried: the call never reached a server or was refused before
    doing anything.
    """

    max_attempts: int = 3
    initial_backoff: float = 0.01
    max_backoff: float = 0.1
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= 5:
            raise ValueError("max_attempts must be within 1..5 (gRPC caps retries at 5)")
        if self.initial_backoff <= 0 or self.max_backoff < self.initial_backoff or self.multiplier < 1:
            raise ValueError("backoff must be > 0, max_backoff >= initial_backoff, multiplier >= 1")


@dataclass(frozen=True)
class TlsConfig:
    """Server CA, and a client certificate and key for mutual TLS."""

    root_certificates: Path | None = None
    certificate_chain: Path | None = None
    private_key: Path | None = None
    # Overrides the name checked against the server certificate (e.g. "localhost" in tests).
    server_name: str | None = None


@dataclass(frozen=True)
class ClientOptions:
    """Everything that shapes a client's behaviour; all fields have working defaults."""

    deadlines: Deadlines = field(default_factory=Deadlines)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Raise TwofoldError instead of returning defaults and fallbacks.
    strict: bool = False
    # Resolve in process from the server's state stream instead of one call per resolve.
    local_evaluation: bool = False
    # Channels per server target: HTTP/2 multiplexes calls on one connection, and one
    # connection is served by one server thread/process; a few spread the load.
    channels: int = 2
    # Exposures and events are sent in the background every `flush_interval` seconds, or
    # sooner once `batch_size` are waiting.
    flush_interval: float = 1.0
    batch_size: int = 500
    # Records kept while a server is unreachable; beyond this the oldest are dropped and counted.
    max_buffered: int = 100_000
    # Exposures of the same unit, flag and variant within this many seconds are sent once.
    exposure_dedup_seconds: float = 3600.0
    exposure_dedup_entries: int = 100_000
    # Last known values kept for STALE answers while the assignment server is unreachable.
    stale_cache_entries: int = 100_000
    # Flush at interpreter exit (atexit) whatever was not sent yet.
    flush_at_exit: bool = True
    tls: TlsConfig | None = None
    # Extra gRPC channel arguments, appended last.
    channel_options: tuple[tuple[str, int | str], ...] = ()

    def __post_init__(self) -> None:
        if self.channels < 1:
            raise ValueError("channels must be >= 1")
        if self.flush_interval <= 0 or self.batch_size < 1 or self.max_buffered < self.batch_size:
            raise ValueError("flush_interval must be > 0, batch_size >= 1, max_buffered >= batch_size")
