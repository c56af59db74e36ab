"""Server settings from command-line flags, then `TWOFOLD_*` environment variables, then defaults.

Every service takes the same transport settings, so they are declared once here. A flag
given on the command line wins; otherwise the environment variable named in its help text
(the Kubernetes way to configure a container); otherwise the default.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

ENV_PREFIX = "TWOFOLD_"
EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def env_default(name: str, default: str | None) -> str | None:
    """The value of `TWOFOLD_<NAME>` if set, else `default`."""
    return os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"), default)


def env_flag(name: str) -> bool:
    """True when `TWOFOLD_<NAME>` is set to a truthy word."""
    value = env_default(name, "") or ""
    return value.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class TlsSettings:
    """Server certificate and key; with `client_ca`, clients must present a certificate (mTLS)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


@dataclass(frozen=True)
class ServerSettings:
    """Transport settings shared by every Twofold gRPC server."""

    host: str = "127.0.0.1"
    port: int = 0
    metrics_host: str = "127.0.0.1"
    # None disables the Prometheus endpoint; 0 picks a free port (reported back).
    metrics_port: int | None = None
    # Server reflection (grpcurl without .proto files); some operators turn it off in production.
    reflection: bool = True
    # When set, every call except health and reflection must carry one of the secrets in this
    # file (one per line) in the `x-twofold-client-secret` metadata; re-read when it changes.
    client_secrets_file: Path | None = None
    # Share the port with other sockets (SO_REUSEPORT): only among one server's own --workers,
    # never by accident with another server started on a port already in use.
    reuse_port: bool = False
    max_message_bytes: int = 16 * 1024 * 1024
    # Calls in flight beyond this are answered RESOURCE_EXHAUSTED instead of queued.
    max_concurrent_rpcs: int | None = 1000
    grace_seconds: float = 10.0
    # Clients are asked to reconnect after this long, so they rebalance onto new pods.
    max_connection_age_seconds: float | None = None
    tls: TlsSettings | None = None
    log_level: str = "info"
    log_format: str = "json"
    # "auto" runs on uvloop where it is installed (it is a dependency on Linux and macOS).
    event_loop: str = "auto"
    extra_options: tuple[tuple[str, int | str], ...] = field(default_factory=tuple)

    @property
    def address(self) -> str:
        """The `host:port` the gRPC server binds to (IPv6 hosts bracketed)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"


def metrics_port_for(port: int, metrics_port: int | None) -> int | None:
    """The Prometheus port: as given (-1 = off), else the chosen gRPC port + 1000 (any free port for 0)."""
    if metrics_port is None:
        return port + 1000 if port else 0
    return None if metrics_port < 0 else metrics_port


def _optional_int(value: str | None) -> int | None:
    return None if value in (None, "") else int(value)


def add_server_arguments(parser: argparse.ArgumentParser, default_port: int, *, metadata_auth: bool = True) -> None:
    """Declare the shared transport flags on a service's subcommand parser.

    `metadata_auth=False` leaves out `--client-secrets-file`, for a service that checks client
    secrets in its requests itself (the assignment server).
    """
    g = parser.add_argument_group("server (flags override TWOFOLD_* environment variables)")
    g.add_argument("--host", default=env_default("host", "0.0.0.0"), help="bind address [TWOFOLD_HOST]")
    g.add_argument("--port", type=int, default=int(env_default("port", str(default_port)) or default_port),
                   help="gRPC port, 0 for any free port [TWOFOLD_PORT]")
    g.add_argument("--metrics-host", default=env_default("metrics_host", "0.0.0.0"),
                   help="Prometheus endpoint bind address [TWOFOLD_METRICS_HOST]")
    g.add_argument("--metrics-port", type=int, default=_optional_int(env_default("metrics_port", None)),
                   help="Prometheus /metrics port, -1 to disable; default the gRPC --port + 1000 "
                        "(any free port when --port is 0) [TWOFOLD_METRICS_PORT]")
    g.add_argument("--max-message-bytes", type=int,
                   default=int(env_default("max_message_bytes", str(16 * 1024 * 1024)) or 0),
                   help="largest request or response message [TWOFOLD_MAX_MESSAGE_BYTES]")
    g.add_argument("--max-concurrent-rpcs", type=int,
                   default=int(env_default("max_concurrent_rpcs", "1000") or 0),
                   help="calls in flight before RESOURCE_EXHAUSTED, 0 for no limit [TWOFOLD_MAX_CONCURRENT_RPCS]")
    g.add_argument("--grace-seconds", type=float, default=float(env_default("grace_seconds", "10") or 10),
                   help="drain time for in-flight calls on SIGTERM [TWOFOLD_GRACE_SECONDS]")
    g.add_argument("--max-connection-age-seconds", type=float,
                   default=float(env_default("max_connection_age_seconds", "0") or 0),
                   help="close connections after this age so clients rebalance, 0 = never "
                        "[TWOFOLD_MAX_CONNECTION_AGE_SECONDS]")
    g.add_argument("--tls-cert", default=env_default("tls_cert", None), help="PEM certificate [TWOFOLD_TLS_CERT]")
    g.add_argument("--tls-key", default=env_default("tls_key", None), help="PEM private key [TWOFOLD_TLS_KEY]")
    g.add_argument("--tls-client-ca", default=env_default("tls_client_ca", None),
                   help="PEM CA bundle; when set, clients must present a certificate it signed "
                        "(mutual TLS) [TWOFOLD_TLS_CLIENT_CA]")
    g.add_argument("--reflection", default=env_default("reflection", "on"), choices=["on", "off"],
                   help="gRPC server reflection, for grpcurl without .proto files [TWOFOLD_REFLECTION]")
    if metadata_auth:
        g.add_argument("--client-secrets-file", default=env_default("client_secrets_file", None),
                       help="file of client secrets, one per line (the assignment server's client "
                            "secrets): every call but health and reflection must send one in the "
                            "x-twofold-client-secret metadata; re-read when the file changes "
                            "[TWOFOLD_CLIENT_SECRETS_FILE]")
    g.add_argument("--ready-file", default=env_default("ready_file", None),
                   help="once serving, atomically write {pid, port, metrics_port} as JSON here "
                        "(how tests and scripts learn a port-0 binding) [TWOFOLD_READY_FILE]")
    g.add_argument("--log-level", default=env_default("log_level", "info"),
                   choices=["debug", "info", "warning", "error"], help="[TWOFOLD_LOG_LEVEL]")
    g.add_argument("--log-format", default=env_default("log_format", "json"), choices=["json", "text"],
                   help="[TWOFOLD_LOG_FORMAT]")
    g.add_argument("--event-loop", default=env_default("event_loop", "auto"), choices=list(EVENT_LOOPS),
                   help="asyncio event loop: uvloop (libuv, less CPU per call), the standard one, or "
                        "auto = uvloop where it is installed [TWOFOLD_EVENT_LOOP]")


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """Build validated settings from parsed flags; raises ValueError on a bad combination."""
    tls: TlsSettings | None = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ValueError("--tls-cert and --tls-key must be given together")
        tls = TlsSettings(Path(args.tls_cert), Path(args.tls_key),
                          Path(args.tls_client_ca) if args.tls_client_ca else None)
    elif args.tls_client_ca:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be within 0..65535, got {args.port}")
    metrics_port = metrics_port_for(args.port, args.metrics_port)
    if metrics_port is not None and metrics_port > 65535:
        raise ValueError(f"the metrics port (--port + 1000 = {metrics_port}) is above 65535: set --metrics-port")
    secrets_file = getattr(args, "client_secrets_file", None)
    if secrets_file and not Path(secrets_file).is_file():
        raise ValueError(f"--client-secrets-file {secrets_file} is not a readable file")
    return ServerSettings(
        host=args.host,
        port=args.port,
        metrics_host=args.metrics_host,
        metrics_port=metrics_port,
        reflection=getattr(args, "reflection", "on") == "on",
        client_secrets_file=Path(secrets_file) if secrets_file else None,
        reuse_port=bool(getattr(args, "reuse_port", False)),
        max_message_bytes=args.max_message_bytes,
        max_concurrent_rpcs=args.max_concurrent_rpcs or None,
        grace_seconds=args.grace_seconds,
        max_connection_age_seconds=args.max_connection_age_seconds or None,
        tls=tls,
        log_level=args.log_level,
        log_format=args.log_format,
        event_loop=getattr(args, "event_loop", "auto"),
    )
