"""A lake in a local (or mounted POSIX) folder: files appear by rename after an fsync."""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from twofold.lakestore.base import LakeStoreError, StoredFile


def fsync_dir(folder: Path) -> None:
    """Make a rename or unlink in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class LocalStore:
    """`LakeStore` over a folder. A temporary file is hidden (`.name.<random>.tmp`) until its rename."""

    root: str
    uri: str = ""
    filesystem: pafs.FileSystem = field(default_factory=pafs.LocalFileSystem)
    local: bool = True

    def __post_init__(self) -> None:
        self.uri = self.uri or self.root
        self._root = Path(self.root)

    def full_path(self, path: str) -> str:
        return str((self._root / path).absolute())

    def publish(self, path: str, data: pa.Buffer | bytes) -> None:
        target = self._root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        # A random suffix: two publishers of one name (a retry racing a recovery) never share a temp file.
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(tmp, "wb") as handle:
                handle.write(memoryview(data))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        fsync_dir(target.parent)

    def list_files(self, prefix: str, suffix: str = ".parquet") -> list[StoredFile]:
        folder = self._root / prefix
        if not folder.is_dir():
            return []
        found = []
        for dirpath, _dirs, names in os.walk(folder):
            for name in names:
                if name.startswith(".") or not name.endswith(suffix):
                    continue
                full = Path(dirpath) / name
                try:
                    stat = full.stat()
                except FileNotFoundError:  # compacted away while we listed
                    continue
                found.append(StoredFile(full.relative_to(self._root).as_posix(), stat.st_size, stat.st_mtime))
        return sorted(found, key=lambda f: f.path)

    def read(self, path: str) -> pa.Buffer:
        return pa.py_buffer((self._root / path).read_bytes())

    def exists(self, path: str) -> bool:
        return (self._root / path).exists()

    def delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self._root / path).unlink()

    def check_writable(self, probe_name: str) -> None:
        try:
            self._root.mkdir(parents=True, exist_ok=True)
            probe = f"_probe/{probe_name}"
            self.publish(probe, b"ok")
            self.delete(probe)
        except OSError as exc:
            raise LakeStoreError(f"cannot write to the lake folder {self.root!r}: {exc}") from exc
