"""Exceptions, raised only by a client in strict mode or on programming errors.

A normal client returns failures as data (`FlagResult.reason`, `Decision.reason`); strict
mode exists for tests and batch jobs that would rather stop than serve a default.
"""

from __future__ import annotations

from client_sdk.results import ErrorCode


class TwofoldError(Exception):
    """A call could not be served as asked; `code` says why."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
