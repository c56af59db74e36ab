"""Wiring of the assignment server: state source, lake writers, token codec, servicer."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from assignment_server.materializations import StickyStore
from assignment_server.service import (
    DEFAULT_TOKEN_MAX_AGE_SECONDS,
    SERVICE_NAME,
    FlagResolverServicer,
    add_to_server,
)
from assignment_server.state_source import StateSource
from assignment_server.tokens import TokenCodec, load_key
from twofold.lake import LakeWriter
from twofold.lakestore import is_url
from twofold.resolver import open_store
from twofold.server import RunningServer, ServiceRegistration, ServiceSetup
from twofold.settings import ServerSettings

log = logging.getLogger("twofold.assignment")


def beside_lake(args: argparse.Namespace, name: str) -> Path:
    """A local file next to the lake folder; for an object-store lake, in the write-ahead folder."""
    if is_url(args.lake):
        return Path(getattr(args, "wal_dir", None) or ".") / name
    return Path(args.lake).resolve().parent / name


def open_materializations(args: argparse.Namespace) -> StickyStore:
    """The sticky-assignment store `--materializations` names (default: SQLite beside the lake)."""
    spec = getattr(args, "materializations", None) or str(beside_lake(args, "materializations.sqlite"))
    store = open_store(spec, timeout=getattr(args, "materializations_timeout", None))
    return StickyStore(store, timeout=getattr(args, "materializations_timeout", None),
                       cache_size=getattr(args, "materializations_cache", 100_000))


def served_allocations_path(spec: str | None, args: argparse.Namespace) -> Path:
    """Where the server records the allocation it serves (default: beside the lake)."""
    return Path(spec) if spec else beside_lake(args, "served-allocations.json")


def warm_lake_encoding() -> None:
    """Run, once, the pyarrow paths the first TrackEvents and ApplyFlags would otherwise pay for.

    The first record batch built from Python objects imports pandas and initialises pyarrow's
    kernels (0.3-0.9 s, mostly holding the GIL); the first compaction loads the Parquet writer.
    Done before the server reports SERVING, so no client call waits for it.
    """
    import io

    import pyarrow as pa

    from twofold.lake import TABLE_SCHEMAS, rows_to_arrow, write_parquet

    samples = {
        "exposures": {"exposure_id": "warm", "ts": 0, "unit": "u", "flag": "flags/f", "rule": "r", "variant": "v",
                      "assignment_id": "a", "resolve_id": "r", "client": "c"},
        "events": {"event_id": "warm", "ts": 0, "unit": "u", "name": "n", "value": 1.0, "properties": "{}"},
    }
    for table, row in samples.items():
        batch = rows_to_arrow([row], TABLE_SCHEMAS[table])
        batch.serialize()
        write_parquet(pa.Table.from_batches([batch]), io.BytesIO(), table)  # type: ignore[arg-type]


def build_setup(args: argparse.Namespace) -> Callable[[ServerSettings], Awaitable[ServiceSetup]]:
    """The `setup` for `twofold.server.run_service` (also used by tests with a Namespace)."""

    async def setup(settings: ServerSettings) -> ServiceSetup:
        source = StateSource(args.flags, poll_interval=args.reload_interval,
                             served_lock=served_allocations_path(getattr(args, "served_allocations", None), args))
        served = source.load_initial()
        key, origin = load_key(getattr(args, "token_key", None), getattr(args, "token_key_file", None))
        if origin == "generated at startup":
            log.warning("no token key configured; generated one (resolve tokens will not survive a restart "
                        "or work across replicas): set TWOFOLD_TOKEN_KEY")
        writer = {"writer_id": getattr(args, "writer_id", None), "wal_dir": getattr(args, "wal_dir", None)}
        exposures = LakeWriter(args.lake, "exposures", **writer)
        events = LakeWriter(args.lake, "events", **writer)
        await exposures.start()
        try:
            await events.start()
        except BaseException:
            await exposures.close()
            raise
        await asyncio.to_thread(warm_lake_encoding)
        store = open_materializations(args)
        servicer = FlagResolverServicer(source, exposures, events, TokenCodec(key), store,
                                        token_max_age=getattr(args, "token_max_age_seconds", None)
                                        or DEFAULT_TOKEN_MAX_AGE_SECONDS)
        # Ids stored shortly before a restart: a client resending a batch whose answer it never
        # got is told "duplicates" instead of storing it twice (issue 14.6).
        servicer.remember_stored(exposures.recent_ids(), events.recent_ids())
        log.info("assignment server ready", extra={"fields": {
            "flags": str(args.flags), "lake": str(args.lake), "generation": served.generation,
            "token_key": origin, "materializations": store.store.describe()}})

        async def on_started(_running: RunningServer) -> None:
            source.start()

        async def on_stop() -> None:
            await source.stop()
            await exposures.close()
            await events.close()
            store.close()

        return ServiceSetup(
            services=[ServiceRegistration(SERVICE_NAME, servicer, add_to_server)],
            on_started=on_started, on_stop=on_stop)

    return setup
