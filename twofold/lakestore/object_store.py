"""A lake on an object store (S3, GCS, ...) through `pyarrow.fs`.

A file is published by writing its bytes, already complete in memory, through one output
stream: S3 makes an object visible only when its PUT (or the completion of a multipart upload)
succeeds, so a reader sees the whole file or none, and writing the same name again replaces it.
There is no rename on object stores, hence no temporary files: a publish that fails leaves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs

from twofold.lakestore.base import LakeStoreError, StoredFile


@dataclass
class ObjectStore:
    """`LakeStore` over `filesystem`, with the lake under `base` (`bucket/prefix`)."""

    uri: str
    filesystem: pafs.FileSystem
    base: str
    local: bool = field(default=False)

    def full_path(self, path: str) -> str:
        return f"{self.base}/{path}" if path else self.base

    def publish(self, path: str, data: pa.Buffer | bytes) -> None:
        with self.filesystem.open_output_stream(self.full_path(path)) as stream:
            stream.write(data)

    def list_files(self, prefix: str, suffix: str = ".parquet") -> list[StoredFile]:
        selector = pafs.FileSelector(self.full_path(prefix), recursive=True, allow_not_found=True)
        found = []
        cut = len(self.base) + 1
        for info in self.filesystem.get_file_info(selector):
            if info.type != pafs.FileType.File or info.base_name.startswith(".") or not info.path.endswith(suffix):
                continue
            mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
            found.append(StoredFile(info.path[cut:], info.size or 0, mtime))
        return sorted(found, key=lambda f: f.path)

    def read(self, path: str) -> pa.Buffer:
        with self.filesystem.open_input_file(self.full_path(path)) as handle:
            return handle.read_buffer()

    def exists(self, path: str) -> bool:
        return self.filesystem.get_file_info(self.full_path(path)).type == pafs.FileType.File

    def delete(self, path: str) -> None:
        try:
            self.filesystem.delete_file(self.full_path(path))
        except FileNotFoundError:
            pass

    def check_writable(self, probe_name: str) -> None:
        probe = f"_probe/{probe_name}"
        try:
            self.publish(probe, b"ok")
            self.delete(probe)
        except (OSError, pa.ArrowException) as exc:
            raise LakeStoreError(f"cannot write to the lake {self.uri!r}: {exc}") from exc
