"""The `LakeStore` interface, the choice of backend from a root, and the storage command-line flags."""

from __future__ import annotations

import argparse
import os
import re
import socket
from dataclasses import dataclass
from typing import Protocol

import pyarrow as pa
import pyarrow.fs as pafs

# Environment variables the AWS SDK inside pyarrow reads itself; the flags below only set them,
# so every reader and writer in the process (and the processes it starts) sees one configuration.
S3_ENVIRONMENT = {
    "s3_endpoint_url": "AWS_ENDPOINT_URL",
    "s3_region": "AWS_REGION",
    "s3_access_key_id": "AWS_ACCESS_KEY_ID",
    "s3_secret_access_key": "AWS_SECRET_ACCESS_KEY",
}


WRITER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def default_writer_id() -> str:
    """`TWOFOLD_WRITER_ID`, else the host name: a StatefulSet pod's name, stable across its restarts."""
    return os.environ.get("TWOFOLD_WRITER_ID") or socket.gethostname()


def check_writer_id(writer_id: str) -> str:
    """The id, or ValueError: it names a folder and prefixes every published file."""
    if not WRITER_ID.fullmatch(writer_id):
        raise ValueError(f"writer id {writer_id!r} must be 1-128 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return writer_id


class LakeStoreError(RuntimeError):
    """The lake's location cannot be used (unknown scheme, missing bucket, refused credentials)."""


@dataclass(frozen=True)
class StoredFile:
    """A published file: its path inside the lake, size in bytes and last modification (epoch s)."""

    path: str
    size: int
    mtime: float


class LakeStore(Protocol):
    """What the lake needs from where its files live. Paths are relative to the lake root, `/`-separated."""

    uri: str
    filesystem: pafs.FileSystem
    local: bool

    def full_path(self, path: str) -> str:
        """The path as `filesystem` names it (for pyarrow datasets and readers)."""
        ...

    def publish(self, path: str, data: pa.Buffer | bytes) -> None:
        """Make `data` appear at `path` whole or not at all, replacing any file there."""
        ...

    def list_files(self, prefix: str, suffix: str = ".parquet") -> list[StoredFile]:
        """Files under `prefix` (recursively) ending in `suffix`, never hidden or temporary ones."""
        ...

    def read(self, path: str) -> pa.Buffer:
        ...

    def exists(self, path: str) -> bool:
        ...

    def delete(self, path: str) -> None:
        """Remove a file; a file already gone is not an error (deletes are retried)."""
        ...

    def check_writable(self, probe_name: str) -> None:
        """Write and delete a small file; LakeStoreError saying why when that fails."""
        ...


def is_url(root: str | os.PathLike[str]) -> bool:
    """True for `scheme://...` roots other than `file://` (those go through an object store)."""
    text = os.fspath(root)
    return "://" in text and not text.startswith("file://")


def open_store(root: str | os.PathLike[str]) -> LakeStore:
    """The store for a lake root: a local path (or `file://`), or a `pyarrow.fs` URL such as `s3://b/p`.

    Raises LakeStoreError for a URL pyarrow cannot open (unknown scheme, malformed bucket).
    Nothing is written here: writers call `check_writable` at start.
    """
    text = os.fspath(root)
    if not is_url(text):
        from twofold.lakestore.local import LocalStore

        return LocalStore(text.removeprefix("file://"))
    from twofold.lakestore.object_store import ObjectStore

    opened = text
    if text.startswith("s3://") and "allow_delayed_open" not in text:
        # A file smaller than one upload part then goes in a single PutObject instead of a
        # three-request multipart upload (measured on the test server: 17 against 26 ms a file).
        opened += ("&" if "?" in text else "?") + "allow_delayed_open=true"
    try:
        filesystem, base = pafs.FileSystem.from_uri(opened)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as exc:
        raise LakeStoreError(f"cannot open lake URL {text!r}: {exc}") from exc
    base = base.strip("/")
    if not base:
        raise LakeStoreError(f"lake URL {text!r} names no bucket")
    return ObjectStore(uri=text, filesystem=filesystem, base=base)


def add_storage_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Flags for an `s3://` lake; each overrides the standard AWS environment variable it names.

    Prefer the environment (a Kubernetes Secret) for the keys: command lines are visible in `ps`.
    """
    parser.add_argument("--s3-endpoint-url", default=None,
                        help="S3 API endpoint, e.g. http://minio:9000 [AWS_ENDPOINT_URL]")
    parser.add_argument("--s3-region", default=None, help="S3 region [AWS_REGION]")
    parser.add_argument("--s3-access-key-id", default=None, help="[AWS_ACCESS_KEY_ID]")
    parser.add_argument("--s3-secret-access-key", default=None, help="[AWS_SECRET_ACCESS_KEY]")


def add_writer_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--writer-id` and `--wal-dir` of a server that writes to the lake, plus the S3 flags."""
    parser.add_argument("--writer-id", default=os.environ.get("TWOFOLD_WRITER_ID"),
                        help="stable id owning this process's write-ahead log: the StatefulSet pod name; "
                             "each --workers process appends -w<k> (default: the host name) [TWOFOLD_WRITER_ID]")
    parser.add_argument("--wal-dir", default=os.environ.get("TWOFOLD_WAL_DIR"),
                        help="local folder for write-ahead logs, on a volume that survives restarts "
                             "(default <lake>/_wal; required when the lake is a URL) [TWOFOLD_WAL_DIR]")
    add_storage_arguments(parser)


def apply_storage_arguments(args: argparse.Namespace) -> None:
    """Export the S3 flags that were given as the AWS environment variables pyarrow reads."""
    for attribute, variable in S3_ENVIRONMENT.items():
        value = getattr(args, attribute, None)
        if value:
            os.environ[variable] = value
