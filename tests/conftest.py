"""Fixtures shared by every test module: a background event loop for real aio servers, an S3 API server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.s3_server import S3Server, running_s3_server
from twofold.testing import BackgroundLoop


@pytest.fixture
def bg_loop() -> Iterator[BackgroundLoop]:
    """An event loop in a thread; servers started on it serve blocking clients in the test."""
    loop = BackgroundLoop()
    try:
        yield loop
    finally:
        loop.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One real S3 API server (moto's, on a loopback port) for the whole run."""
    with running_s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The AWS_* variables pointing at the test S3 server, for this process and those it starts."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server
