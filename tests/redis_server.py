"""A real `redis-server` process on a loopback port, for the tests of the Redis materialization store.

Debian's `redis-server` package provides the binary (`.ci/run` installs it). The server keeps an
append-only file fsynced on every write in its folder, so a SIGKILLed server restarted on the
same folder has every acknowledged write, like a managed Redis with AOF persistence.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, folder: Path, port: int | None = None, *, persistent: bool = True,
                 tls: tuple[Path, Path, Path] | None = None, password: str | None = None) -> None:
        """`tls`: (certificate, key, CA) files: the port then speaks TLS only; `password`: requirepass."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server; .ci/run does it)")
        self.binary = binary
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or _free_port()
        self.persistent = persistent
        self.tls = tls
        self.password = password
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        listen = ["--port", str(self.port)]
        if self.tls:
            cert, key, ca = self.tls
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
                      "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
        if self.password:
            listen += ["--requirepass", self.password]
        self.proc = subprocess.Popen(
            [self.binary, *listen, "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--appendonly", "yes" if self.persistent else "no", "--appendfsync", "always", "--save", "",
             "--protected-mode", "no",
             "--logfile", str(self.folder / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        deadline = time.time() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError as exc:
                if self.proc.poll() is not None or time.time() > deadline:
                    log = (self.folder / "redis.log").read_text()
                    raise RuntimeError(f"redis-server did not start: {log}") from exc
                time.sleep(0.05)
            except redis.BusyLoadingError:
                time.sleep(0.05)
        client.close()

    def client(self) -> redis.Redis:
        tls = {"ssl": True, "ssl_ca_certs": str(self.tls[2])} if self.tls else {}
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=5,
                           password=self.password, **tls)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # SIGKILL ends a SIGSTOPped process too
            self.proc.wait(timeout=10)
        self.proc = None
