"""Request errors that carry their gRPC status and a metrics reason.

Validation code raises `RequestError`; the servicers turn it into an aborted call with the
status and a message that says what was wrong, and count it under `reason`.
"""

from __future__ import annotations

import grpc


class RequestError(Exception):
    """A request the server refuses; `reason` labels `twofold_model_failures_total`."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason


def invalid(message: str, reason: str = "invalid_argument") -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message, reason)


def not_found(message: str, reason: str = "not_found") -> RequestError:
    return RequestError(grpc.StatusCode.NOT_FOUND, message, reason)


def expired() -> RequestError:
    """The call's deadline passed before its work started: the work is skipped (nobody waits for it)."""
    return RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed before the model ran",
                        "deadline")


def too_large(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, "too_large")
