"""A value loaded from files and loaded again when they change: certificates, client secrets.

Kubernetes rotates a mounted Secret by swapping a symlink (`..data`), cert-manager by rewriting
the files; either way a server should pick up the new content without a restart. `current()`
looks at the files' identity (device, inode, size, mtime) at most once per `interval`, and
reloads when it changed. A load that fails (a half-written file, a key that does not match its
certificate) is logged and the last good value is kept, so a bad rotation never takes the
server down; it is tried again once the files change again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

log = logging.getLogger("twofold.server")

T = TypeVar("T")
Signature = tuple[tuple[int, int, int, int], ...]


def _signature(paths: Sequence[Path]) -> Signature:
    out = []
    for path in paths:
        st = os.stat(path)  # follows symlinks: a ..data swap changes the inode
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class WatchedFiles(Generic[T]):
    """`load(paths)` once now (errors raise: a server must not start without it), then on change."""

    def __init__(self, paths: Sequence[Path], load: Callable[[Sequence[Path]], T], *, what: str,
                 interval: float = 1.0) -> None:
        self.paths = tuple(paths)
        self._load = load
        self.what = what
        self.interval = interval
        self._lock = threading.Lock()  # TLS fetchers run on gRPC core threads
        self._signature = _signature(self.paths)
        self._value = load(self.paths)
        self._checked = time.monotonic()
        self.reloads = 0

    def current(self) -> T:
        """The latest good value; reloads first when the files changed since the last look."""
        self.changed()
        return self._value

    def changed(self) -> bool:
        """Reload if the files changed (checked at most once per interval); True when a new value loaded."""
        now = time.monotonic()
        if now - self._checked < self.interval:
            return False
        with self._lock:
            if now - self._checked < self.interval:
                return False
            self._checked = now
            try:
                signature = _signature(self.paths)
            except OSError as exc:
                log.warning("cannot stat watched files; keeping the loaded ones", extra={"fields": {
                    "what": self.what, "error": str(exc)}})
                return False
            if signature == self._signature:
                return False
            try:
                value = self._load(self.paths)
            except Exception as exc:
                # Remember the signature: the same broken content is not retried on every look.
                self._signature = signature
                log.error("reloading failed; keeping the previous ones", extra={"fields": {
                    "what": self.what, "files": [str(p) for p in self.paths], "error": str(exc)}})
                return False
            self._signature = signature
            self._value = value
            self.reloads += 1
            log.info("reloaded", extra={"fields": {"what": self.what, "files": [str(p) for p in self.paths]}})
            return True


def load_secrets(paths: Sequence[Path]) -> frozenset[str]:
    """Client secrets, one per line; blank lines and `#` comments ignored. Empty is an error."""
    secrets = frozenset(line.strip() for p in paths for line in p.read_text().splitlines()
                        if line.strip() and not line.strip().startswith("#"))
    if not secrets:
        raise ValueError(f"no client secrets in {', '.join(map(str, paths))}")
    return secrets
