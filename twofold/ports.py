"""Port checks shared by the server runtime and the model server's `--workers` parent.

Kept free of gRPC and Prometheus imports: the workers parent must not import prometheus_client
before it sets up multiprocess metrics.
"""

from __future__ import annotations

import socket


class PortInUseError(OSError):
    """A port the server must bind is taken: the message is the one line to show the operator."""


def check_port_free(host: str, port: int, purpose: str) -> None:
    """Raise `PortInUseError` when `port` cannot be bound exclusively (a test bind, then released)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise PortInUseError(f"{purpose} port {port} on {host} is already in use ({exc.strerror or exc}): "
                                 "stop the other server or choose another --port") from None
