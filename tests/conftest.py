"""Fixtures shared by every test module: a background event loop for real aio servers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from twofold.testing import BackgroundLoop


@pytest.fixture
def bg_loop() -> Iterator[BackgroundLoop]:
    """An event loop in a thread; servers started on it serve blocking clients in the test."""
    loop = BackgroundLoop()
    try:
        yield loop
    finally:
        loop.close()
