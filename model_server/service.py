"""The `twofold.model.v1.ModelService` servicer: Predict, Score, Decide, ListModels.

Thin on purpose (the MLServer way): it resolves the model version once, validates the input
through the version's `LoadedModel`, runs ONNX Runtime and shapes the response. Small calls run
the model on the event loop (a row costs microseconds; a thread hop would cost more); calls of
`BATCH_ROWS` rows or more (Score's candidate lists, large Predict batches) run in the
`BatchPool`, so one large call does not hold up every other call. One-row Predict and Decide
runs go through a `RunCoalescer`, which runs them inline unless calls are queueing, and then
joins concurrent ones into one run (see `model_server.coalescing`). Every refusal carries a
status and a message saying what was wrong, and is counted by reason.

Calls nobody waits for any more are not worked on: a call whose deadline has passed when its
model would run is answered DEADLINE_EXCEEDED without running it, and a cancelled call's task is
cancelled by gRPC at its next wait (the pool drops it if it had not started). A Decide is logged
exactly when it is decided: the deadline is checked (and the decision log's back-pressure waited
for) before the policy runs, and a decision made is logged even if the client has gone meanwhile,
as it may have been delivered; a retry with the same `decision_id` replays the same arm.
"""

from __future__ import annotations

import logging
import random
import time

import grpc
import numpy as np

from model_server.batch_pool import BatchPool
from model_server.coalescing import RunCoalescer
from model_server.decision_log import DecisionLog, LogBehindError
from model_server.errors import RequestError, expired, invalid, too_large
from model_server.metrics import count_failure
from model_server.repository import ModelRepository, Refusal
from model_server.runtime import BATCH_ROWS, LoadedModel, rows_from_bytes
from protos.twofold.model.v1 import model_pb2, model_pb2_grpc
from twofold.server import ServiceRegistration

log = logging.getLogger("twofold.model.service")

SERVICE_NAME = model_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
_perf = time.perf_counter
# Version 4 and the RFC 4122 variant, as uuid.UUID(int=..., version=4) sets them.
_UUID4_KEEP = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def new_decision_id() -> str:
    """A random version-4 UUID as 32 hex digits, the shape `uuid.uuid4().hex` gives.

    Drawn from `random` rather than `uuid.uuid4()`: the UUID object and the getrandom syscall
    cost ~15 µs of a Decide's CPU on cold caches, this ~1 µs. The id needs uniqueness, not
    secrecy (a client may send its own id, and the policy's randomness is a hash of it);
    CPython reseeds `random` in every forked `--workers` process, so workers do not repeat ids.
    """
    return "%032x" % (random.getrandbits(128) & _UUID4_KEEP | _UUID4_SET)


MAX_MESSAGE = 2000


async def refuse(context: grpc.aio.ServicerContext, error: RequestError, model_name: str,
                 model: LoadedModel | None) -> None:
    """Count the failure and abort the call with its status and message."""
    if model is not None:
        model.metrics.failure(error.reason)
    else:
        # Not labelled with a name no model has: any caller could grow the series without bound.
        count_failure("" if error.reason == "unknown_model" else model_name, "", error.reason)
    # The message travels in a header, which clients refuse beyond 16 kB: a message quoting a huge
    # name from the request would turn a clear error into RESOURCE_EXHAUSTED "Stream removed".
    message = error.message if len(error.message) <= MAX_MESSAGE else error.message[:MAX_MESSAGE] + " ...(cut)"
    await context.abort(error.code, message)


# Rows per Predict or Score call: bounds the memory a call takes beyond its request (outputs,
# the context broadcast to every candidate, the ranking). Larger batches are split by the caller.
MAX_ROWS = 100_000


def check_rows(rows: int, what: str) -> None:
    if rows > MAX_ROWS:
        raise too_large(f"{what}: {rows} rows, at most {MAX_ROWS} per call; split the batch")


def check_deadline(context: grpc.aio.ServicerContext) -> None:
    """DEADLINE_EXCEEDED (and no model run) when the caller has stopped waiting."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise expired()


async def internal(context: grpc.aio.ServicerContext, exc: Exception, model_name: str,
                   model: LoadedModel | None, method: str) -> None:
    """An unexpected error: logged with its traceback, answered INTERNAL, the server keeps serving."""
    log.exception("unexpected error", extra={"fields": {"model": model_name, "method": method}})
    await refuse(context, RequestError(grpc.StatusCode.INTERNAL, f"{method} failed: {exc}", "internal"),
                 model_name, model)


class ModelServicer(model_pb2_grpc.ModelServiceServicer):
    """Serves the models of one repository; logs decisions when given a decision log."""

    def __init__(self, repository: ModelRepository, decisions: DecisionLog | None = None,
                 coalescer: RunCoalescer | None = None, pool: BatchPool | None = None) -> None:
        self.repository = repository
        self.decisions = decisions
        self.coalescer = coalescer if coalescer is not None else RunCoalescer(window_seconds=0)
        self.pool = pool if pool is not None else BatchPool()

    async def Predict(self, request: model_pb2.PredictRequest,
                      context: grpc.aio.ServicerContext) -> model_pb2.PredictResponse:
        model = None
        try:
            model = self.repository.get(request.model, request.version)
            which = request.WhichOneof("input")
            if which == "dense":
                dense = request.dense
                check_rows(dense.rows, "dense")
                if dense.rows >= BATCH_ROWS:
                    response, seconds = await self.pool.run(lambda: self._predict_batch(model, dense),
                                                            context.time_remaining())
                    self._count(model, "Predict", dense.rows, seconds)
                    return response
                x = model.dense(dense.data, dense.rows, dense.cols)
            elif which == "named":
                x = model.named(request.named.values)
            else:
                raise invalid("Predict needs `dense` rows or `named` features", "missing_input")
            check_deadline(context)
            t0 = _perf()
            joined = self.coalescer.predict(model, x) if x.shape[0] == 1 else None
            out = model.predict(x) if joined is None else await joined
            self._count(model, "Predict", x.shape[0], _perf() - t0)
            return self._predicted(model, out)
        except RequestError as error:
            await refuse(context, error, request.model, model)
        except Exception as exc:
            await internal(context, exc, request.model, model, "Predict")
        raise AssertionError("unreachable")  # abort() raises

    @staticmethod
    def _count(model: LoadedModel, method: str, rows: int, seconds: float) -> None:
        metrics = model.metrics.methods[method]
        metrics.latency.observe(seconds)
        metrics.requests.inc()
        metrics.batch.observe(rows)

    @classmethod
    def _predict_batch(cls, model: LoadedModel, dense: model_pb2.DenseRows) -> tuple[model_pb2.PredictResponse, float]:
        """Validate, run and shape a large batch (in the pool): the response and the model's seconds."""
        x = model.dense(dense.data, dense.rows, dense.cols)
        t0 = _perf()
        out = model.predict(x)
        seconds = _perf() - t0
        return cls._predicted(model, out), seconds

    @staticmethod
    def _predicted(model: LoadedModel, out: np.ndarray) -> model_pb2.PredictResponse:
        return model_pb2.PredictResponse(
            model=model.name, version=model.version, outputs=out.ravel().tolist(),
            rows=out.shape[0], cols=out.shape[1], output_names=model.manifest.output_names)

    async def Score(self, request: model_pb2.ScoreRequest,
                    context: grpc.aio.ServicerContext) -> model_pb2.ScoreResponse:
        model = None
        try:
            model = self.repository.get(request.model, request.version)
            if model.is_policy:
                raise invalid(f"model {model.name!r} is a bandit policy; ask it with Decide", "wrong_method")
            if not request.HasField("candidates"):
                raise invalid("Score needs `candidates` rows", "missing_input")
            c = request.candidates
            check_rows(c.rows, "candidates")
            if c.rows >= BATCH_ROWS:
                response, seconds = await self.pool.run(lambda: self._score(model, request),
                                                        context.time_remaining())
            else:
                check_deadline(context)
                response, seconds = self._score(model, request)
            self._count(model, "Score", c.rows, seconds)
            return response
        except RequestError as error:
            await refuse(context, error, request.model, model)
        except Exception as exc:
            await internal(context, exc, request.model, model, "Score")
        raise AssertionError("unreachable")

    @staticmethod
    def _score(model: LoadedModel, request: model_pb2.ScoreRequest) -> tuple[model_pb2.ScoreResponse, float]:
        """Validate, score and rank the candidates: the response and the model's seconds."""
        c = request.candidates
        x = rows_from_bytes(c.data, c.rows, c.cols, "candidates")
        if request.HasField("context"):
            ctx = rows_from_bytes(request.context.data, request.context.rows, request.context.cols, "context")
            if ctx.shape[0] != 1:
                raise invalid(f"context must be a single row, got {ctx.shape[0]}", "wrong_shape")
            if ctx.shape[1] + x.shape[1] != model.width:
                raise invalid(f"context ({ctx.shape[1]} columns) + candidates ({x.shape[1]} columns) must "
                              f"make the {model.width} features of model {model.name!r}", "wrong_shape")
            x = np.hstack([np.broadcast_to(ctx, (x.shape[0], ctx.shape[1])), x])
        model.check_input(x, "candidates")
        t0 = _perf()
        scores = model.score(x)
        order = np.argsort(-scores, kind="stable")
        if request.top_k:
            order = order[:request.top_k]
        seconds = _perf() - t0
        return model_pb2.ScoreResponse(model=model.name, version=model.version, scores=scores.tolist(),
                                       order=order.tolist()), seconds

    async def Decide(self, request: model_pb2.DecideRequest,
                     context: grpc.aio.ServicerContext) -> model_pb2.DecideResponse:
        model = None
        try:
            model = self.repository.get(request.model, request.version)
            if not model.is_policy:
                raise invalid(f"model {model.name!r} is a {model.manifest.kind}, not a bandit policy; "
                              "use Predict or Score", "wrong_method")
            if not request.unit:
                raise invalid("Decide needs the `unit` the decision is for (rewards join on it)", "missing_unit")
            which = request.WhichOneof("context")
            if which == "dense":
                dense = request.dense
                if dense.rows != 1:
                    raise invalid(f"Decide takes one context row, got rows={dense.rows}", "wrong_shape")
                x = model.dense(dense.data, dense.rows, dense.cols, "context")
            elif which == "named":
                x = model.named(request.named.values)
            else:
                raise invalid("Decide needs a `dense` or `named` context", "missing_input")
            if self.decisions is not None:
                await self.decisions.admit(context.time_remaining())
            check_deadline(context)
            decision_id = request.decision_id or new_decision_id()
            metrics = model.metrics.methods["Decide"]
            t0 = _perf()
            joined = self.coalescer.decide(model, x, decision_id)
            scores, arm, propensity = model.decide(x, decision_id) if joined is None else await joined
            metrics.latency.observe(_perf() - t0)
            metrics.requests.inc()
            model.metrics.decisions[arm].inc()
            model.metrics.propensity.observe(propensity)
            arm_name = model.arms[arm]
            if self.decisions is not None:
                await self.decisions.log(DecisionLog.record(
                    decision_id, request.unit, model.name, model.version, arm_name, propensity, x[0].tolist()))
            return model_pb2.DecideResponse(
                decision_id=decision_id, arm=arm_name, arm_index=arm, propensity=propensity,
                scores=scores.tolist(), model=model.name, version=model.version)
        except RequestError as error:
            await refuse(context, error, request.model, model)
        except LogBehindError as exc:
            await refuse(context, RequestError(grpc.StatusCode.UNAVAILABLE, str(exc), "log_behind"),
                         request.model, model)
        except Exception as exc:
            await internal(context, exc, request.model, model, "Decide")
        raise AssertionError("unreachable")

    async def ListModels(self, request: model_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> model_pb2.ListModelsResponse:
        response = model_pb2.ListModelsResponse()
        served_models = self.repository.snapshot.models
        refused: dict[str, list[Refusal]] = {}
        for refusal in self.repository.refusals.values():
            refused.setdefault(refusal.model, []).append(refusal)
        for name in sorted(set(served_models) | set(refused)):
            served = served_models.get(name)
            if served is not None:
                manifest = served.default.manifest
                info = response.models.add(name=name, kind=manifest.kind, feature_names=manifest.feature_names,
                                           output_names=manifest.output_names, arms=manifest.arms,
                                           default_version=served.default.version)
                for version, loaded in served.versions.items():
                    info.versions.add(version=version, ready=True, loaded_at_unix_ms=int(loaded.loaded_at * 1000))
            else:
                info = response.models.add(name=name)
            for refusal in sorted(refused.get(name, ()), key=lambda r: -int(r.version)):
                info.refused_versions.add(version=refusal.version, ready=False, error=refusal.error)
        return response


def registration(repository: ModelRepository, decisions: DecisionLog | None = None,
                 coalescer: RunCoalescer | None = None, pool: BatchPool | None = None) -> ServiceRegistration:
    return ServiceRegistration(SERVICE_NAME, ModelServicer(repository, decisions, coalescer, pool),
                               model_pb2_grpc.add_ModelServiceServicer_to_server)
