"""Publishing a new version into a repository so that a watching server never sees half of it.

The files are written into a hidden temporary directory beside the versions, fsynced, and the
directory is renamed to the next version number in one step. If another publisher took that
number first, the next free one is used.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from model_server.manifest import MANIFEST_FILE, MODEL_FILE, Manifest


@dataclass(frozen=True)
class Published:
    """Where a version went."""

    model: str
    version: str
    path: Path
    manifest: Manifest


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def next_version(model_dir: Path) -> int:
    """One more than the highest numeric version present (1 for a new model)."""
    if not model_dir.is_dir():
        return 1
    numbers = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()]
    return max(numbers, default=0) + 1


def publish(repository: str | os.PathLike[str], manifest: Manifest, model_bytes: bytes,
            version: int | None = None) -> Published:
    """Write `model_bytes` and `manifest` (with the model's SHA-256 filled in) as a new version."""
    import hashlib

    manifest = replace(manifest, model_sha256=hashlib.sha256(model_bytes).hexdigest())
    manifest.validate()
    model_dir = Path(repository) / manifest.name
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        (tmp / MODEL_FILE).write_bytes(model_bytes)
        (tmp / MANIFEST_FILE).write_text(manifest.to_json())
        for name in (MODEL_FILE, MANIFEST_FILE):
            _fsync_file(tmp / name)
        number = version or next_version(model_dir)
        while True:
            target = model_dir / str(number)
            try:
                os.rename(tmp, target)  # fails if the target exists and is not empty
                break
            except OSError:
                if version is not None or not target.exists():
                    raise
                number += 1
        _fsync_file(model_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Published(manifest.name, str(number), target, manifest)
