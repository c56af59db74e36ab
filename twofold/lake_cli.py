"""`twofold lake compact` and `twofold lake recover`: maintenance of a lake, wherever it lives."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import re
import sys

from twofold.cli import Command
from twofold.lakestore import add_storage_arguments, apply_storage_arguments
from twofold.settings import env_default

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 1024, "mi": 1024**2, "gi": 1024**3}


def parse_age(text: str) -> dt.timedelta:
    """`90s`, `30m`, `1h`, `2d` or `0` (compact everything)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|m|h|d)?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"ages look like 0, 90s, 30m, 1h or 2d; got {text!r}")
    return dt.timedelta(seconds=float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2) or "s"])


def parse_size(text: str) -> int:
    """`256MB`, `1GiB`, `500000` (bytes)."""
    match = _SIZE.fullmatch(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"sizes look like 256MB, 1GiB or a number of bytes; got {text!r}")
    unit = (match.group(2) or "").lower().removesuffix("b")
    return int(float(match.group(1)) * _UNITS[unit])


def _configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = sub.add_parser("compact", help="merge each partition's small Parquet files into large ones")
    c.add_argument("lake", nargs="?", default=env_default("lake", "data/lake"),
                   help="lake folder or URL, e.g. s3://bucket/lake [TWOFOLD_LAKE]")
    c.add_argument("--table", action="append", choices=["exposures", "events", "decisions"],
                   help="table to compact (repeatable; default: all)")
    c.add_argument("--older-than", type=parse_age, default=parse_age("1h"),
                   help="only merge files published at least this long ago (default 1h; 0 = all)")
    c.add_argument("--target-size", type=parse_size, default=parse_size("256MB"),
                   help="size of a merged file (default 256MB; files of half of it are left alone). "
                        "Memory needed: a few times this")
    add_storage_arguments(c)
    r = sub.add_parser("recover", help="publish the write-ahead logs of writers that are gone (run where "
                                       "their volume is mounted)")
    r.add_argument("lake", nargs="?", default=env_default("lake", "data/lake"),
                   help="lake folder or URL [TWOFOLD_LAKE]")
    r.add_argument("--wal-dir", default=env_default("wal_dir", None),
                   help="write-ahead folder (default <lake>/_wal) [TWOFOLD_WAL_DIR]")
    r.add_argument("--writer-id", action="append", help="only these writer ids (repeatable; default: every id "
                                                        "in the folder no live process holds)")
    add_storage_arguments(r)
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])


def _run(args: argparse.Namespace) -> int:
    from twofold.lakestore import LakeStoreError
    from twofold.logs import configure_logging

    configure_logging(args.log_level, "text")
    apply_storage_arguments(args)
    try:
        result = _compact(args) if args.action == "compact" else _recover(args)
    except (LakeStoreError, OSError, ValueError) as exc:
        print(f"twofold lake {args.action}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


def _compact(args: argparse.Namespace) -> dict:
    from twofold.lake_compact import compact

    report = compact(args.lake, args.table, older_than=args.older_than, target_bytes=args.target_size)
    return dataclasses.asdict(report)


def _recover(args: argparse.Namespace) -> dict:
    """Start and close a writer under each dead id: its own recovery publishes the leftovers."""
    from twofold.lake import TABLE_SCHEMAS, LakeWriter, resolve_wal_dir

    wal_dir = resolve_wal_dir(args.lake, args.wal_dir)
    recovered: dict[str, list[str]] = {}
    skipped: list[str] = []
    for table in TABLE_SCHEMAS:
        folder = wal_dir / table
        if not folder.is_dir():
            continue
        for writer_id in args.writer_id or sorted(p.name for p in folder.iterdir() if p.is_dir()):
            if not any((folder / writer_id).glob("*.wal")):
                continue
            writer = LakeWriter(args.lake, table, writer_id=writer_id, wal_dir=wal_dir)
            try:
                writer.start_sync()
            except RuntimeError:
                skipped.append(f"{table}/{writer_id}")  # a live process holds it
                continue
            writer.close_sync()
            recovered.setdefault(table, []).append(writer_id)
    return {"recovered": recovered, "skipped_live": skipped}


LAKE = Command(_configure, _run)
