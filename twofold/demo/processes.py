"""Twofold servers as child processes: start on free ports, find them, stop them, always.

Each server starts with `--port 0 --metrics-port 0 --ready-file F` and publishes its bound
ports in F once it serves (twofold.server.write_ready_file), so nothing races for a port.
`ServerGroup` remembers the PIDs it started and stops exactly those, first with SIGTERM (the
servers drain in-flight calls and flush their write-ahead logs into Parquet), then SIGKILL if a
server does not exit in time. The demo and the end-to-end tests share this code.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

# Not resolve(): the project root as imported (a symlinked checkout stays itself).
ROOT = Path(__file__).absolute().parents[2]

T = TypeVar("T")


class ServerStartError(RuntimeError):
    """A server exited or did not report ready in time; the message holds the end of its log."""


@dataclass
class ServerProcess:
    """One started server: its process, bound ports and log file."""

    name: str
    args: list[str]
    proc: subprocess.Popen[bytes]
    log_path: Path
    ready_file: Path
    port: int = 0
    metrics_port: int | None = None
    # The analysis server's results web UI, when it opened one.
    http_port: int | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait up to `timeout`, then SIGKILL; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL (tests of crash behaviour)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_server(name: str, args: Sequence[str], workdir: Path, *, port: int = 0, timeout: float = 90.0,
                 env: dict[str, str] | None = None,
                 on_spawn: Callable[[ServerProcess], None] | None = None) -> ServerProcess:
    """Run `python -m twofold ARGS` with a ready file and a log file under `workdir`.

    `port` 0 lets the server pick a free port; a given port restarts a server where its
    clients already point. `on_spawn` learns the process as soon as it exists, before it is
    ready, so an interruption during start-up still knows what to stop.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    ready = workdir / f"{name}.ready.json"
    ready.unlink(missing_ok=True)
    log_path = workdir / f"{name}.log"
    log = log_path.open("ab")
    full = [sys.executable, "-m", "twofold", *args, "--host", "127.0.0.1", "--port", str(port),
            "--metrics-host", "127.0.0.1", "--metrics-port", "0", "--ready-file", str(ready)]
    proc = subprocess.Popen(full, cwd=ROOT, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT,
                            # Own process group: a Ctrl-C in the terminal reaches the demo only,
                            # which then stops its servers in order (drain, flush) itself.
                            start_new_session=True)
    server = ServerProcess(name=name, args=list(args), proc=proc, log_path=log_path, ready_file=ready, _log=log)
    if on_spawn is not None:
        on_spawn(server)
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop(timeout=5)
            raise ServerStartError(f"{name} did not start (exit code {proc.returncode}); "
                                   f"log {log_path}:\n{server.log_tail()}")
        time.sleep(0.05)
    info = json.loads(ready.read_text())
    server.port, server.metrics_port = int(info["port"]), info.get("metrics_port")
    server.http_port = info.get("http_port")
    return server


class ServerGroup:
    """The servers one run started; `stop_all()` stops them in reverse order of start."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.servers: dict[str, ServerProcess] = {}
        self._lock = threading.Lock()

    def start(self, name: str, args: Sequence[str], **kwargs: object) -> ServerProcess:
        """Start a server (thread-safe: servers may be started concurrently)."""
        def register(server: ServerProcess) -> None:
            with self._lock:
                self.servers[name] = server

        return start_server(name, args, self.workdir, on_spawn=register, **kwargs)  # type: ignore[arg-type]

    def stop(self, name: str, timeout: float = 20.0) -> int | None:
        with self._lock:
            server = self.servers.pop(name, None)
        return server.stop(timeout) if server is not None else None

    def stop_all(self, timeout: float = 20.0) -> None:
        with self._lock:
            names = list(self.servers)
        for name in reversed(names):
            self.stop(name, timeout)

    def __enter__(self) -> ServerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


class InterruptGuard:
    """Turn Ctrl-C, SIGTERM and SIGHUP into one KeyboardInterrupt, saying "stopping..." at once.

    Why: SIGTERM and SIGHUP (the terminal closed) would otherwise kill the demo without running
    its cleanup, leaving its servers running and its --temp folder behind; and Ctrl-C landing
    in a long step (training, a draining server) looked like nothing happened. The first signal
    prints a line and raises KeyboardInterrupt, so `finally` blocks stop the servers; later
    signals only say that stopping is under way, so they cannot cut the cleanup short. Keep
    the guard active around the cleanup too.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, say: Callable[[str], None] | None = None) -> None:
        self._previous: dict[int, object] = {}
        self._say = say or say_on_stderr
        self.stopping = False
        self._task: asyncio.Task[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __enter__(self) -> InterruptGuard:
        def handler(signum: int, frame: object) -> None:
            name = signal.Signals(signum).name
            if self.stopping:
                self._say(f"{name}: still stopping the servers the demo started...")
                return
            self.stopping = True
            self._say(f"\n{name}: stopping... (the servers the demo started, then its temporary files)")
            task, loop = self._task, self._loop
            if task is not None and loop is not None and not task.done():
                task.cancel()  # run_async turns it into KeyboardInterrupt once the coroutine unwound
                loop.call_soon_threadsafe(lambda: None)  # wake the loop if it sleeps in select()
                return
            raise KeyboardInterrupt(name)

        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]

    def run_async(self, coro: Coroutine[Any, Any, T]) -> T:
        """`asyncio.run(coro)`, where a stop signal cancels the coroutine instead of raising in the loop.

        Why: a KeyboardInterrupt raised by the signal handler lands wherever the loop happens to
        be, gRPC's aio callbacks included, and could leave the client's channels unable to finish
        its final flush: the demo then hung instead of stopping (seen once in CI). Cancelling the
        task unwinds the coroutine through its `async with` and `finally` blocks in order (the SDK
        client flushes and closes), and the interrupt is raised here afterwards, outside the loop.
        """

        async def main() -> T:
            self._task, self._loop = asyncio.current_task(), asyncio.get_running_loop()
            try:
                return await coro
            finally:
                self._task = self._loop = None

        try:
            return asyncio.run(main())
        except asyncio.CancelledError:
            if self.stopping:
                raise KeyboardInterrupt("stopping") from None
            raise


def say_on_stderr(message: str) -> None:
    """Print, unless the terminal is gone (SIGHUP): stopping must not fail on a closed stderr."""
    try:
        print(message, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
