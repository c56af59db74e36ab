"""`twofold serve-echo`: the echo service behind the full server runtime, in its own process."""

from __future__ import annotations

import argparse

from twofold.cli import Command
from twofold.server import ServerSettings, ServiceSetup, run_service
from twofold.settings import add_server_arguments


def _configure(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser, default_port=50050)


def _run(args: argparse.Namespace) -> int:
    from twofold.echo import registration

    async def setup(_settings: ServerSettings) -> ServiceSetup:
        return ServiceSetup(services=[registration()])

    return run_service(args, setup)


SERVE = Command(configure=_configure, run=_run)
