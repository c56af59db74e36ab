"""The model repository: versions on disk, the ones being served, and hot swaps between them.

Layout: `<root>/<model>/<version>/{model.onnx, manifest.json}`, versions are positive integers,
and an optional `<root>/<model>/config.yaml` sets that model's version policy
(`version_policy: {latest: 2}` or `{specific: [3, 5]}`), else the server-wide default applies.

The served state is one immutable `Snapshot` (model -> versions). A refresh builds the next
snapshot beside the current one (new versions are loaded and warmed up in a worker thread) and
then replaces it by a single reference assignment on the event loop. A call resolves its model
once and keeps that reference until it returns, so a swap never affects a call in flight, and
an old session is freed when the last call holding it finishes (reference counting).

What is refused while the previous version keeps serving: a version directory without a
manifest (still being written; not counted as a failure), a manifest that does not parse, a
`model.onnx` whose SHA-256 differs from the manifest (corrupted or half-copied), a graph
ONNX Runtime cannot load or that does not match its manifest, and a graph that loads but whose
warm-up run fails. Any exception while loading or warming one version refuses that version only:
a scan that stopped at the first broken version would leave every later update unapplied and,
at startup, leave the server unable to start at all (a crash loop on every replica mounting the
repository). A refused version is counted, logged, listed by ListModels with its reason, and
retried only when its files change.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from model_server.errors import not_found
from model_server.manifest import MANIFEST_FILE, MODEL_FILE, ManifestError, read_manifest
from model_server.metrics import LOAD_FAILURES, LOADED_VERSIONS
from model_server.runtime import LoadedModel
from model_server.version_policy import VersionPolicy
from twofold.metrics import declare

log = logging.getLogger("twofold.model.repository")

CONFIG_FILE = "config.yaml"


@dataclass(frozen=True)
class ServedModel:
    """One model's loaded versions, newest first; `default` serves requests without a version."""

    name: str
    versions: Mapping[str, LoadedModel]
    default: LoadedModel
    policy: VersionPolicy


@dataclass(frozen=True)
class Refusal:
    """Why a version on disk is not served (until its files change)."""

    model: str
    version: str
    error: str
    refused_at: float


@dataclass(frozen=True)
class Snapshot:
    """Everything being served, replaced as a whole on every change."""

    models: Mapping[str, ServedModel] = field(default_factory=dict)


def _fingerprint(version_dir: Path) -> tuple[tuple[int, int], ...] | None:
    """Sizes and modification times of a version's files; None while its manifest is absent."""
    stats = []
    for name in (MANIFEST_FILE, MODEL_FILE):
        try:
            st = (version_dir / name).stat()
        except FileNotFoundError:
            return None
        stats.append((st.st_size, st.st_mtime_ns))
    return tuple(stats)


class ModelRepository:
    """Loads, watches and serves the models under `root`."""

    def __init__(self, root: str | os.PathLike[str], default_policy: VersionPolicy | None = None,
                 poll_seconds: float = 1.0, batch_threads: int = 1) -> None:
        self.root = Path(root)
        self.batch_threads = batch_threads
        self.default_policy = default_policy or VersionPolicy()
        self.poll_seconds = poll_seconds
        self.snapshot = Snapshot()
        # (model, version) -> fingerprint of the files that failed, so they are not retried unchanged.
        self._refused: dict[tuple[str, str], object] = {}
        # (model, version) -> why it was refused, for ListModels; replaced whole by each scan.
        self.refusals: Mapping[tuple[str, str], Refusal] = {}
        self._refusals: dict[tuple[str, str], Refusal] = {}
        self._fingerprints: dict[tuple[str, str], object] = {}
        self._lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self.generation = 0

    # -- lookups on the hot path --------------------------------------------------------------
    def get(self, name: str, version: str = "") -> LoadedModel:
        """The version to serve, or NOT_FOUND saying which models or versions exist."""
        served = self.snapshot.models.get(name)
        if served is None:
            known = ", ".join(sorted(self.snapshot.models)) or "none"
            raise not_found(f"unknown model {name!r} (loaded models: {known})", "unknown_model")
        if not version:
            return served.default
        loaded = served.versions.get(version)
        if loaded is None:
            raise not_found(f"model {name!r} has no loaded version {version!r} (loaded: "
                            f"{', '.join(served.versions)}; policy {served.policy.describe()})", "unknown_version")
        return loaded

    # -- loading ---------------------------------------------------------------------------------
    def _policy_for(self, model_dir: Path) -> VersionPolicy:
        config = model_dir / CONFIG_FILE
        if not config.exists():
            return self.default_policy
        try:
            data = yaml.safe_load(config.read_text()) or {}
            if "version_policy" not in data:
                return self.default_policy
            return VersionPolicy.from_config(data["version_policy"])
        except (OSError, yaml.YAMLError, ValueError, TypeError, AttributeError) as exc:
            log.error("model config refused; using the server's default policy", extra={"fields": {
                "path": str(config), "error": str(exc)}})
            return self.default_policy

    def _load(self, name: str, version: str, path: Path) -> LoadedModel:
        manifest = read_manifest(path)
        if manifest.name != name:
            raise ManifestError(f"manifest names model {manifest.name!r} but it lives under {name!r}")
        return LoadedModel(manifest, version, path, self.batch_threads)

    def _scan_model(self, model_dir: Path, current: ServedModel | None) -> ServedModel | None:
        """Decide (in a worker thread) which versions of one model to serve, loading new ones."""
        name = model_dir.name
        declare(LOAD_FAILURES, name)
        policy = self._policy_for(model_dir)
        on_disk = sorted((int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()
                          and int(p.name) > 0), reverse=True)
        if policy.specific:
            candidates = [v for v in on_disk if v in policy.specific]
        else:
            candidates = on_disk
        chosen: dict[str, LoadedModel] = {}
        for number in candidates:
            if policy.latest is not None and len(chosen) >= policy.latest:
                break
            version = str(number)
            path = model_dir / version
            fingerprint = _fingerprint(path)
            key = (name, version)
            old = current.versions.get(version) if current else None
            if fingerprint is None:
                # No manifest yet (or the model file vanished): keep serving what we had.
                if old is not None:
                    chosen[version] = old
                continue
            if old is not None and self._fingerprints.get(key) == fingerprint:
                chosen[version] = old
                continue
            if self._refused.get(key) == fingerprint:
                if old is not None:
                    chosen[version] = old
                continue
            try:
                loaded = self._load(name, version, path)
            except Exception as exc:  # whatever breaks one version (warm-up included) must not stop the scan
                self._refuse(key, fingerprint, exc)
                if old is not None:
                    chosen[version] = old
                continue
            self._fingerprints[key] = fingerprint
            self._refused.pop(key, None)
            self._refusals.pop(key, None)
            log.info("model version loaded", extra={"fields": {"model": name, "version": version,
                                                                "kind": loaded.manifest.kind}})
            chosen[version] = loaded
        if not chosen:
            return None
        ordered = dict(sorted(chosen.items(), key=lambda kv: -int(kv[0])))
        return ServedModel(name, ordered, next(iter(ordered.values())), policy)

    def _refuse(self, key: tuple[str, str], fingerprint: object, exc: BaseException) -> None:
        """Record a version as refused: counted, logged with the reason, listed by ListModels."""
        name, version = key
        reason = str(exc) if isinstance(exc, ManifestError | OSError) else f"{type(exc).__name__}: {exc}"
        self._refused[key] = fingerprint
        self._refusals[key] = Refusal(name, version, reason, time.time())
        LOAD_FAILURES.labels(name).inc()
        log.error("model version refused; previous versions keep serving", extra={"fields": {
            "model": name, "version": version, "error": reason}})

    def _scan(self) -> dict[str, ServedModel]:
        models: dict[str, ServedModel] = {}
        if not self.root.is_dir():
            log.warning("model repository does not exist (yet)", extra={"fields": {"root": str(self.root)}})
            return models
        current = self.snapshot.models
        for model_dir in sorted(self.root.iterdir()):
            if not model_dir.is_dir() or model_dir.name.startswith((".", "_")):
                continue
            try:
                served = self._scan_model(model_dir, current.get(model_dir.name))
            except Exception:  # e.g. the model's folder vanished mid-scan: keep serving what it had
                log.exception("model scan failed; its loaded versions keep serving", extra={"fields": {
                    "model": model_dir.name}})
                served = current.get(model_dir.name)
            if served is not None:
                models[served.name] = served
        # Refusals of versions no longer on disk are forgotten (a removed version is not a problem).
        self.refusals = {k: r for k, r in self._refusals.items() if (self.root / k[0] / k[1]).is_dir()}
        self._refusals = dict(self.refusals)
        return models

    async def refresh(self) -> bool:
        """Rescan the repository and swap in the result; True when anything changed."""
        async with self._lock:
            models = await asyncio.to_thread(self._scan)
            before = self.snapshot.models
            changed = set(models) != set(before) or any(
                dict(models[n].versions) != dict(before[n].versions) for n in models)
            if changed:
                self.snapshot = Snapshot(models)
                self.generation += 1
                for name in set(before) | set(models):
                    LOADED_VERSIONS.labels(name).set(len(models[name].versions) if name in models else 0)
                log.info("model repository swapped", extra={"fields": {
                    "generation": self.generation,
                    "models": {n: list(m.versions) for n, m in models.items()}}})
            return changed

    async def watch(self) -> None:
        """Poll the repository until cancelled (works on every filesystem, NFS and volumes too)."""
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                await self.refresh()
            except Exception:  # A failed scan must never stop the watcher; the last state serves.
                log.exception("model repository scan failed")

    def start_watching(self) -> None:
        if self._watcher is None and self.poll_seconds > 0:
            self._watcher = asyncio.get_running_loop().create_task(self.watch())

    async def stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            try:
                await self._watcher
            except asyncio.CancelledError:
                pass
            self._watcher = None
