"""The served state and its hot reload.

The flag source (a folder of YAML, or a Confidence JSON state file) is polled; a change of any
file's *content* (not its mtime: Kubernetes ConfigMaps swap a `..data` symlink, which moves no
mtime of the files seen through it) triggers a compile off the event loop. A state that fails to
compile or load is refused, logged and counted; the last good state keeps serving. A good one
is swapped in with one assignment (readers see the old or the new state, never a mix) and
watchers (WatchState streams) are woken.

A flags folder is compiled against the allocation this server last served, which it records
(the allocation lock of the served state) in memory and in a file that survives restarts. A
change that would move units of a running experiment (out of its arm, or into an experiment it
is exclusive with) is refused like an invalid one, whether or not the author updated the
folder's `allocations.lock.json`: see `assignment_server.authoring.integrity`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter, Gauge

from assignment_server.authoring.compiler import LOCK_FILE, compile_folder, read_lock, write_lock
from assignment_server.authoring.errors import FlagFileError, Problem
from twofold import waiting
from twofold.resolver import ResolverState, StateError

log = logging.getLogger("twofold.assignment.state")

STATE_GENERATION = Gauge("twofold_assignment_state_generation", "Generation of the state being served.")
LAST_RELOAD = Gauge("twofold_assignment_last_reload_success_timestamp_seconds",
                    "Unix time of the last successful state load.")
RELOAD_FAILURES = Counter("twofold_assignment_reload_failures",
                          "Refused flag changes (the last good state keeps serving).")


@dataclass(frozen=True)
class Served:
    """One generation of state: what resolves use and what WatchState sends."""

    generation: int
    state: ResolverState
    state_json: bytes
    loaded_at: float


def source_fingerprint(path: Path) -> str:
    """A hash of the content of every flag file (and the allocation lock) under `path`."""
    digest = hashlib.sha256()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if (p.suffix in (".yaml", ".yml") or p.name == LOCK_FILE) and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        for p in files:
            digest.update(str(p.relative_to(path)).encode() + b"\0")
            digest.update(p.read_bytes() + b"\0")
    else:
        digest.update(path.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class _Loaded:
    state: ResolverState
    state_json: bytes
    warnings: list[str]
    lock: dict | None  # the allocation it serves (flags folders only)


def _load(path: Path, served: dict | None) -> _Loaded:
    """Compile/load the source; a folder is checked against `served`, the allocation being served."""
    if not path.is_dir():
        state_json = path.read_bytes()
        return _Loaded(ResolverState.from_json(state_json), state_json, [], None)
    result = compile_folder(path, served=served)
    warnings = list(result.warnings)
    if result.lock_changed and result.lock.get("segments"):
        warnings.append(f"{path / LOCK_FILE} is missing or out of date (`twofold flags lock` was not run): this "
                        "server checks changes against what it served, but a replica without that record starts "
                        "from the folder's lock")
    state_json = result.state_json()
    return _Loaded(ResolverState.from_json(state_json), state_json, warnings, result.lock)


class StateSource:
    """Holds the current `Served` state and reloads it when the source changes."""

    def __init__(self, path: str | Path, poll_interval: float = 1.0, served_lock: str | Path | None = None) -> None:
        """`served_lock`: file recording the allocation served, so a restart keeps checking against it."""
        self.path = Path(path)
        self.poll_interval = poll_interval
        self.served_lock_path = Path(served_lock) if served_lock else None
        self.served_lock: dict | None = None
        self.current: Served | None = None
        self._fingerprint: str | None = None
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    def load_initial(self) -> Served:
        """Load synchronously at startup; a bad initial source is fatal (nothing to fall back to)."""
        fingerprint = source_fingerprint(self.path)
        if self.served_lock_path is not None and self.path.is_dir():
            try:
                self.served_lock = read_lock(self.served_lock_path)
            except ValueError as exc:  # no record to trust: starting would risk moving running units
                raise FlagFileError([Problem(str(self.served_lock_path), 1, f"unreadable record of the served "
                                                                            f"allocation: {exc}")]) from exc
        try:
            loaded = _load(self.path, self.served_lock)
        except FlagFileError as exc:
            if self.served_lock is not None and any("refused:" in p.message for p in exc.problems):
                exc.problems.append(Problem(str(self.served_lock_path), 1, "the changes above were checked against "
                                            "this record of the allocation served before the restart; remove it "
                                            "only to deliberately start every running experiment over"))
            raise FlagFileError(exc.problems) from exc
        for w in loaded.warnings:
            log.warning("flag source warning", extra={"fields": {"warning": w}})
        self._swap(loaded, fingerprint)
        self._record(loaded.lock)
        assert self.current is not None
        return self.current

    def _record(self, lock: dict | None) -> None:
        """Remember the allocation now served (memory first: the file only carries it across restarts)."""
        if lock is None:
            return
        self.served_lock = lock
        if self.served_lock_path is None:
            return
        try:
            write_lock(self.served_lock_path, lock)
        except OSError as exc:
            log.error("cannot record the served allocation; after a restart, changes are checked against the "
                      "folder's allocations.lock.json only", extra={"fields": {"path": str(self.served_lock_path),
                                                                                 "error": str(exc)}})

    def _swap(self, loaded: _Loaded, fingerprint: str) -> None:
        state, state_json = loaded.state, loaded.state_json
        now = time.time()
        previous = self.current.generation if self.current else 0
        generation = max(previous + 1, int(now * 1000))
        self.current = Served(generation, state, state_json, now)
        self._fingerprint = fingerprint
        STATE_GENERATION.set(generation)
        LAST_RELOAD.set(now)
        log.info("state loaded", extra={"fields": {"generation": generation, "flags": len(state.flags),
                                                   "source": str(self.path)}})

    async def reload_if_changed(self) -> bool:
        """Check the source once; returns True when a new state was swapped in."""
        try:
            fingerprint = await asyncio.to_thread(source_fingerprint, self.path)
        except OSError as exc:
            # Mid-swap of a ConfigMap, or the file is gone: keep serving and retry next poll.
            log.warning("flag source unreadable", extra={"fields": {"error": str(exc)}})
            return False
        if fingerprint == self._fingerprint:
            return False
        try:
            loaded = await asyncio.to_thread(_load, self.path, self.served_lock)
        except (FlagFileError, StateError, OSError, ValueError) as exc:
            RELOAD_FAILURES.inc()
            self._fingerprint = fingerprint  # do not retry the same broken content every poll
            problems = [str(p) for p in getattr(exc, "problems", [])] or [str(exc)]
            log.error("flag change refused; the last good state keeps serving",
                      extra={"fields": {"source": str(self.path), "problems": problems[:50]}})
            return False
        if not loaded.state.flags and self.current is not None and self.current.state.flags:
            # Most likely a mount in transition or a deleted folder, not an intent to drop every flag.
            RELOAD_FAILURES.inc()
            self._fingerprint = fingerprint
            log.error("flag change refused: the new source has no flags at all; the last good state keeps serving",
                      extra={"fields": {"source": str(self.path)}})
            return False
        for w in loaded.warnings:
            log.warning("flag source warning", extra={"fields": {"warning": w}})
        self._swap(loaded, fingerprint)
        await asyncio.to_thread(self._record, loaded.lock)
        async with self._changed:
            self._changed.notify_all()
        return True

    async def wait_for_change(self, generation: int, max_wait: float | None = None) -> Served:
        """Return once the served generation differs from `generation` (or on timeout)."""
        async with self._changed:
            if self.current is not None and self.current.generation == generation:
                await waiting.within(self._changed.wait(), max_wait)
        assert self.current is not None
        return self.current

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.reload_if_changed()
            except Exception:  # never let the watcher die
                RELOAD_FAILURES.inc()
                log.exception("state reload crashed; the last good state keeps serving")

    def start(self) -> None:
        if self._task is None and self.poll_interval > 0:
            self._task = asyncio.get_running_loop().create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
