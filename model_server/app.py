"""Assembling the model server: repository, decision log, the two gRPC services, lifecycle hooks."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field

from model_server import inference, service
from model_server.batch_pool import BatchPool
from model_server.coalescing import DEFAULT_MAX_ROWS, DEFAULT_WINDOW_SECONDS, RunCoalescer
from model_server.decision_log import DEFAULT_MAX_LAG_S, DecisionLog
from model_server.repository import ModelRepository, VersionPolicy
from twofold.server import RunningServer, ServiceSetup

log = logging.getLogger("twofold.model")


def _warm_arrow() -> None:
    import pyarrow as pa

    pa.array([0.0])


@dataclass(frozen=True)
class ModelServerConfig:
    """What `twofold serve-model` is told besides the shared transport settings."""

    repository: str
    lake: str | None = "data/lake"
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    poll_seconds: float = 1.0
    durable_decisions: bool = False
    lake_compact_interval_s: float = 2.0
    batch_threads: int = 1
    # One-row runs joined while calls queue (model_server.coalescing); a window of 0 turns it off.
    coalesce_window_ms: float = DEFAULT_WINDOW_SECONDS * 1000
    coalesce_max_rows: int = DEFAULT_MAX_ROWS
    # Threads for calls of BATCH_ROWS rows or more (model_server.batch_pool); 0 = one per core, at most 4.
    pool_threads: int = 0
    # Decide waits while the decision log's oldest unsynced hand-over is older than this (decision_log).
    decision_max_lag_ms: float = DEFAULT_MAX_LAG_S * 1000
    # The decision log's owner id and local write-ahead folder (twofold.lake); None: the defaults.
    writer_id: str | None = None
    wal_dir: str | None = None


@dataclass
class ModelServerParts:
    """The live pieces, for tests and embedding (e.g. the demo runs the server in-process)."""

    repository: ModelRepository
    decisions: DecisionLog | None
    setup: ServiceSetup


async def build(config: ModelServerConfig) -> ModelServerParts:
    """Load the repository once (so the server starts ready), open the decision log, wire services."""
    repository = ModelRepository(config.repository, config.version_policy, config.poll_seconds,
                                 config.batch_threads)
    await repository.refresh()
    if repository.generation == 0:
        repository.generation = 1  # scanned, even if empty: the server is ready to answer
    decisions: DecisionLog | None = None
    if config.lake:
        from twofold.lake import LakeWriter

        writer = LakeWriter(root=os.fspath(config.lake), table="decisions", writer_id=config.writer_id,
                            wal_dir=config.wal_dir, compact_interval_s=config.lake_compact_interval_s,
                            recent_ids_capacity=0)  # decision ids are made here: no client resends them
        await writer.start()
        # pyarrow imports pandas the first time it builds an array from Python objects (~0.2 s,
        # mostly holding the GIL). Pay that now, before serving, not in the first compaction
        # while Decide calls are answered.
        await asyncio.to_thread(_warm_arrow)
        decisions = DecisionLog(writer, durable=config.durable_decisions,
                                max_lag=config.decision_max_lag_ms / 1000)

    coalescer = RunCoalescer(config.coalesce_window_ms / 1000, config.coalesce_max_rows)
    pool = BatchPool(config.pool_threads or None)

    async def on_started(running: RunningServer) -> None:
        repository.start_watching()
        log.info("model server ready", extra={"fields": {
            "repository": config.repository, "lake": config.lake, "port": running.port,
            "policy": config.version_policy.describe(),
            "models": {n: list(m.versions) for n, m in repository.snapshot.models.items()}}})

    async def on_stop() -> None:
        await repository.stop_watching()
        if decisions is not None:
            await decisions.close()
        await asyncio.to_thread(pool.close)

    setup = ServiceSetup(
        services=[service.registration(repository, decisions, coalescer, pool),
                  inference.registration(repository, pool)],
        on_started=on_started, on_stop=on_stop)
    return ModelServerParts(repository, decisions, setup)
