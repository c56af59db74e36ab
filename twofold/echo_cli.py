"""`twofold serve-echo`: the echo service behind the full server runtime, in its own process."""

from __future__ import annotations

import argparse

from twofold.cli import Command
from twofold.server import ServerSettings, ServiceSetup, run_service
from twofold.settings import add_server_arguments


def _configure(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser, default_port=50050)
    parser.add_argument("--bare", action="store_true",
                        help="plain grpc.aio server: no health, reflection, metrics or limits (the baseline)")


def _run(args: argparse.Namespace) -> int:
    from twofold.echo import registration

    if args.bare:
        return _run_bare(args)

    async def setup(_settings: ServerSettings) -> ServiceSetup:
        return ServiceSetup(services=[registration()])

    return run_service(args, setup)


SERVE = Command(configure=_configure, run=_run)


def _run_bare(args: argparse.Namespace) -> int:
    """Serve the bare echo until SIGTERM/SIGINT; publish the port through --ready-file."""
    import asyncio
    import signal

    from twofold.echo import start_bare_echo
    from twofold.server import write_ready_port

    async def main() -> None:
        server, port = await start_bare_echo(args.host, args.port)
        write_ready_port(args.ready_file, port, None)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(1)

    asyncio.run(main())
    return 0
