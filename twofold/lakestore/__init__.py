"""Where the lake's Parquet files live: a local folder or an object store, behind one small interface.

The lake writer, the compactor and the readers name files by their path *inside* the lake
(`events/date=2026-12-03/host-0-....parquet`) and ask a `LakeStore` to publish, list, read and
delete them. Two backends: `local` (a POSIX folder: write a temporary file, fsync, rename) and
`object_store` (any `pyarrow.fs` filesystem behind a URL: `s3://`, `gs://`; a file appears with
one PUT, never half-written). Write-ahead logs never live here: they need fsync and append,
which object stores do not offer, so they stay on local disk (`twofold.lake`).
"""

from __future__ import annotations

from twofold.lakestore.base import (
    LakeStore,
    LakeStoreError,
    StoredFile,
    add_storage_arguments,
    add_writer_arguments,
    apply_storage_arguments,
    check_writer_id,
    default_writer_id,
    is_url,
    open_store,
)

__all__ = ["LakeStore", "LakeStoreError", "StoredFile", "add_storage_arguments", "add_writer_arguments",
           "apply_storage_arguments", "check_writer_id", "default_writer_id",
           "is_url", "open_store"]
