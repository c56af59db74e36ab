"""`serve-analysis`: recompute every configured experiment on a schedule and serve the results over gRPC.

The scheduler re-reads the experiment files on every round, so adding a YAML file adds an
experiment without a restart. A file that stops parsing keeps its last good definition (and its
results) and reports the error; a computation that fails leaves the last good results in place and
counts a failure. Computations run one at a time in a worker thread (DuckDB itself uses the cores),
so gRPC calls are answered while a round is in progress.

Metrics for SREs (docs/metrics.md): last success time, duration, rows scanned and SRM alarm per
experiment, and failures.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter, Gauge

from analysis_worker.analyze import Analysis, analyze
from analysis_worker.compute import compute_results
from analysis_worker.config import ConfigError, ExperimentConfig, load_experiment
from analysis_worker.engine import Engine, make_engine
from analysis_worker.inputs import InputError, parse_input
from analysis_worker.looks import LookLog
from protos.twofold.analysis.v1 import analysis_pb2, analysis_pb2_grpc
from twofold import waiting
from twofold.metrics import declare
from twofold.server import ServiceRegistration

log = logging.getLogger("twofold.analysis")

SERVICE_NAME = analysis_pb2.DESCRIPTOR.services_by_name["AnalysisService"].full_name

LAST_SUCCESS = Gauge("twofold_analysis_last_success_timestamp_seconds",
                     "Unix time of the last successful computation.", ["experiment"])
DURATION = Gauge("twofold_analysis_duration_seconds", "Duration of the last computation.", ["experiment"])
ROWS_SCANNED = Gauge("twofold_analysis_rows_scanned", "Lake rows read by the last computation.", ["experiment"])
SRM_MISMATCH = Gauge("twofold_analysis_srm_mismatch",
                     "1 when the last computation detected a sample-ratio mismatch.", ["experiment"])
FAILURES = Counter("twofold_analysis_failures", "Failed computations.", ["experiment"])


@dataclass
class ExperimentState:
    """The last good definition and results of one experiment, and the last error."""

    name: str
    source: str
    config: ExperimentConfig | None = None
    analysis: Analysis | None = None
    computed_at: dt.datetime | None = None
    # Last computation error (empty after a success) and the last refused edit of the definition.
    error: str = ""
    definition_error: str = ""
    # The looks a sequential experiment published (loaded from beside the results on first use).
    looks: LookLog | None = None

    def summary_error(self) -> str:
        return "; ".join(e for e in (self.definition_error, self.error) if e)


def _timestamp(value: dt.datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value.astimezone(dt.UTC))
    return ts


class AnalysisWorker:
    """Owns the experiments, the schedule and the latest results."""

    def __init__(self, experiment_paths: Sequence[str | Path], lake: str | Path, *, every_seconds: float = 900.0,
                 out_dir: str | Path | None = None, threads: int | None = None,
                 memory_limit: str | None = None, engine: Engine | None = None) -> None:
        self.paths = [Path(p) for p in experiment_paths]
        self.lake = lake  # a folder or an object-store URL (a Path would mangle s3://)
        self.every_seconds = every_seconds
        self.out_dir = Path(out_dir) if out_dir else None
        self.threads = threads
        self.memory_limit = memory_limit
        # A Spark engine keeps its session across rounds (it takes tens of seconds to start).
        self.engine = engine or make_engine("duckdb", threads=threads, memory_limit=memory_limit)
        self.experiments: dict[str, ExperimentState] = {}
        self._by_source: dict[str, str] = {}
        self.load_errors: dict[str, str] = {}
        self.rounds = 0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        # Called (in the computing thread) after each successful computation, e.g. the web UI's history.
        self.on_computed: list[Callable[[ExperimentState], None]] = []

    def _files(self) -> list[Path]:
        files: list[Path] = []
        for p in self.paths:
            if p.is_dir():
                files += sorted([*p.glob("*.yaml"), *p.glob("*.yml")])
            elif p.exists():
                files.append(p)
            else:
                self.load_errors[str(p)] = f"{p}: no such file or folder"
        return files

    def reload(self) -> None:
        """Re-read every definition; a broken file keeps its last good definition."""
        self.load_errors = {}
        for file in self._files():
            source = str(file)
            try:
                config = load_experiment(file)
            except ConfigError as exc:
                self.load_errors[source] = str(exc)
                name = self._by_source.get(source)
                if name:
                    self.experiments[name].definition_error = f"definition refused, keeping the last good one: {exc}"
                log.warning("experiment definition refused", extra={"fields": {"file": source, "error": str(exc)}})
                continue
            owner = next((s.source for s in self.experiments.values()
                          if s.name == config.name and s.source != source), None)
            if owner is not None:
                self.load_errors[source] = f"{source}: experiment {config.name!r} is already defined in {owner}"
                continue
            previous = self._by_source.get(source)
            if previous and previous != config.name:
                self.experiments.pop(previous, None)
            state = self.experiments.setdefault(config.name, ExperimentState(name=config.name, source=source))
            state.config = config
            declare(FAILURES, config.name)
            state.source = source
            state.definition_error = ""
            self._by_source[source] = config.name

    def compute_one(self, state: ExperimentState) -> None:
        """Compute one experiment (blocking: call from a worker thread); never raises."""
        assert state.config is not None
        try:
            result = analyze(state.config, self.lake, engine=self.engine)
        except Exception as exc:  # a bug must not stop the other experiments
            log.exception("analysis crashed", extra={"fields": {"experiment": state.name}})
            FAILURES.labels(state.name).inc()
            state.error = f"internal error: {exc}"
            return
        DURATION.labels(state.name).set(result.duration_seconds)
        ROWS_SCANNED.labels(state.name).set(result.rows_scanned)
        if result.error:
            FAILURES.labels(state.name).inc()
            state.error = result.error
            if state.analysis is None or state.analysis.error:
                state.analysis, state.computed_at = result, dt.datetime.now(dt.UTC)
            log.warning("analysis failed", extra={"fields": {"experiment": state.name, "error": result.error}})
            return
        SRM_MISMATCH.labels(state.name).set(1.0 if result.document["srm"]["mismatch"] else 0.0)
        try:
            self._publish_look(state, result)
        except (OSError, ValueError) as exc:  # an unreadable or unwritable log: publish nothing new
            log.exception("recording the look failed", extra={"fields": {"experiment": state.name}})
            FAILURES.labels(state.name).inc()
            state.error = f"recording the sequential look failed: {exc}"
            return
        state.analysis, state.computed_at, state.error = result, dt.datetime.now(dt.UTC), ""
        LAST_SUCCESS.labels(state.name).set(time.time())
        for listener in self.on_computed:
            try:
                listener(state)
            except Exception:
                log.exception("results listener failed", extra={"fields": {"experiment": state.name}})
        if self.out_dir is not None:
            try:
                result.write(self.out_dir)
            except OSError as exc:
                log.warning("could not write results", extra={"fields": {"experiment": state.name, "error": str(exc)}})
        log.info("analysis computed", extra={"fields": {
            "experiment": state.name, "seconds": round(result.duration_seconds, 3), "rows": result.rows_scanned,
            "recommendation": result.document["decision"]["recommendation"]}})

    def _publish_look(self, state: ExperimentState, result: Analysis) -> None:
        """Every published computation of a sequential experiment is a look: record it (beside the
        results, so a restart keeps it) and publish what the look log says (see `analysis_worker.looks`)."""
        if not result.document.get("sequential"):
            return
        if state.looks is None or state.looks.experiment != state.name:
            state.looks = LookLog.load(self.out_dir, state.name)
        result.document = state.looks.publish(result.document)
        result.reset_html()
        state.looks.save()

    async def run_round(self) -> None:
        """Reload definitions and compute every experiment once."""
        self.reload()
        for state in list(self.experiments.values()):
            if state.config is not None:
                await asyncio.to_thread(self.compute_one, state)
        self.rounds += 1

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_round()
            except Exception:
                log.exception("analysis round failed")
            self._wake.clear()
            await waiting.within(self._wake.wait(), self.every_seconds)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def trigger(self) -> None:
        """Start the next round now instead of waiting for the schedule."""
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        await asyncio.to_thread(self.engine.close)


class AnalysisServicer(analysis_pb2_grpc.AnalysisServiceServicer):
    """ListExperiments and GetResults from the worker's state; ComputeFromStatistics on demand."""

    def __init__(self, worker: AnalysisWorker | None) -> None:
        self.worker = worker

    async def ListExperiments(self, request: analysis_pb2.ListExperimentsRequest,
                              context: grpc.aio.ServicerContext) -> analysis_pb2.ListExperimentsResponse:
        out = analysis_pb2.ListExperimentsResponse()
        states = sorted(self.worker.experiments.values(), key=lambda s: s.name) if self.worker else []
        for state in states:
            doc: dict[str, Any] = state.analysis.document if state.analysis else {}
            summary = analysis_pb2.ExperimentSummary(
                name=state.name, flag=state.config.flag if state.config else "",
                recommendation=(doc.get("decision") or {}).get("recommendation", "") if doc else "",
                srm_mismatch=bool((doc.get("srm") or {}).get("mismatch", False)) if doc else False,
                error=state.summary_error())
            ts = _timestamp(state.computed_at)
            if ts is not None:
                summary.computed_at.CopyFrom(ts)
            out.experiments.append(summary)
        return out

    async def GetResults(self, request: analysis_pb2.GetResultsRequest,
                         context: grpc.aio.ServicerContext) -> analysis_pb2.GetResultsResponse:
        if not request.experiment:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "experiment: required")
        state = self.worker.experiments.get(request.experiment) if self.worker else None
        if state is None:
            known = ", ".join(sorted(self.worker.experiments)) if self.worker else ""
            # Quoted at most 200 characters: the message travels in a header clients cap at 16 kB.
            shown = request.experiment if len(request.experiment) <= 200 else request.experiment[:200] + "..."
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no experiment {shown!r}; configured: {known or 'none'}")
        assert state is not None
        if state.analysis is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"experiment {request.experiment!r} has not been computed yet; retry shortly")
        assert state.analysis is not None
        response = analysis_pb2.GetResultsResponse(results_json=json.dumps(state.analysis.document))
        if request.include_html:
            response.report_html = await asyncio.to_thread(lambda: state.analysis.html)  # type: ignore[union-attr]
        ts = _timestamp(state.computed_at)
        if ts is not None:
            response.computed_at.CopyFrom(ts)
        return response

    async def ComputeFromStatistics(self, request: analysis_pb2.ComputeFromStatisticsRequest,
                                    context: grpc.aio.ServicerContext
                                    ) -> analysis_pb2.ComputeFromStatisticsResponse:
        # Everything here comes from the caller, so every failure is answered INVALID_ARGUMENT naming
        # input_json, never UNKNOWN: JSON nested deeper than Python's recursion limit (RecursionError),
        # integers of more than 4300 digits (ValueError), numbers a float cannot hold (OverflowError).
        try:
            raw = json.loads(request.input_json)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"input_json is not valid JSON: {exc}")
        try:
            inp = parse_input(raw)
        except InputError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (ValueError, TypeError, ArithmeticError, RecursionError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"input_json: {type(exc).__name__}: {exc}")
        try:
            document = await asyncio.to_thread(compute_results, inp)
            results_json = json.dumps(document)
        except (ValueError, ArithmeticError) as exc:
            log.warning("statistics refused", extra={"fields": {"error": repr(exc)}})
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"input_json: these statistics cannot be computed: {type(exc).__name__}: {exc}")
        return analysis_pb2.ComputeFromStatisticsResponse(results_json=results_json)


def registration(worker: AnalysisWorker | None) -> ServiceRegistration:
    """The analysis service for `twofold.server.start_server`."""
    return ServiceRegistration(SERVICE_NAME, AnalysisServicer(worker),
                               analysis_pb2_grpc.add_AnalysisServiceServicer_to_server)
