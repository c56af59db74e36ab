"""The Open Inference Protocol (KServe v2 / Triton) over the same repository.

Any OIP client (tritonclient, KServe tooling) can check health, read metadata and run the raw
graph: inputs arrive in `raw_input_contents` (or typed `contents`), outputs always leave in
`raw_output_contents`, which is where tritonclient reads them. Bandit policies are served here
as plain graphs: the caller supplies the `random` input and nothing is logged; use
`ModelService.Decide` for logged decisions.
"""

from __future__ import annotations

import logging
import math
import time

import grpc
import numpy as np

from model_server.batch_pool import BatchPool
from model_server.errors import RequestError, invalid, not_found
from model_server.repository import ModelRepository
from model_server.runtime import BATCH_ROWS, LoadedModel
from model_server.service import check_deadline, check_rows, internal, refuse
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from twofold import __version__
from twofold.server import ServiceRegistration

log = logging.getLogger("twofold.model.inference")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "twofold-model-server"
PLATFORM = "onnxruntime_onnx"

_DTYPES = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"), "INT64": np.dtype("<i8"), "INT32": np.dtype("<i4"),
           "BOOL": np.dtype("?")}
_CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents",
             "INT32": "int_contents", "BOOL": "bool_contents"}


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """OIP health, metadata and inference for every model in the repository."""

    def __init__(self, repository: ModelRepository, pool: BatchPool | None = None) -> None:
        self.repository = repository
        self.pool = pool if pool is not None else BatchPool()

    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.repository.generation > 0)

    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        try:
            self.repository.get(request.name, request.version)
        except RequestError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=[])

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        try:
            model = self.repository.get(request.name, request.version)
        except RequestError as error:
            await refuse(context, error, request.name, None)
            raise AssertionError("unreachable") from None
        served = self.repository.snapshot.models.get(model.name)  # None if it vanished meanwhile
        versions = list(served.versions) if served is not None else [model.version]
        inputs, outputs = model.io_metadata()
        meta = pb.ModelMetadataResponse
        return meta(name=model.name, versions=versions, platform=PLATFORM,
                    inputs=[meta.TensorMetadata(name=n, datatype=d, shape=s) for n, d, s in inputs],
                    outputs=[meta.TensorMetadata(name=n, datatype=d, shape=s) for n, d, s in outputs])

    def _inputs(self, model: LoadedModel, request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
        """Decode and check every input tensor against the graph's signature."""
        expected = model.input_types()
        raw = request.raw_input_contents
        if raw and len(raw) != len(request.inputs):
            raise invalid(f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents entries", "wrong_shape")
        feeds: dict[str, np.ndarray] = {}
        for i, tensor in enumerate(request.inputs):
            if tensor.name not in expected:
                raise invalid(f"model {model.name!r} has no input {tensor.name!r} (inputs: {', '.join(expected)})",
                              "unknown_input")
            if tensor.datatype != expected[tensor.name]:
                raise invalid(f"input {tensor.name!r} must be {expected[tensor.name]}, got {tensor.datatype}",
                              "wrong_dtype")
            shape = tuple(int(d) for d in tensor.shape)
            spec = next(s for s in model.manifest.inputs if s.name == tensor.name)
            if len(shape) != len(spec.shape) or any(w not in (-1, g) for w, g in zip(spec.shape, shape, strict=True)) \
                    or any(g < 0 for g in shape):
                raise invalid(f"input {tensor.name!r} must have shape {list(spec.shape)} (-1: any), got {list(shape)}",
                              "wrong_shape")
            if shape:
                check_rows(shape[0], f"input {tensor.name!r}")
            dtype = _DTYPES[tensor.datatype]
            count = math.prod(shape)  # Python ints: a huge shape cannot wrap around as np.prod's int64 can
            if raw:
                if len(raw[i]) != count * dtype.itemsize:
                    raise invalid(f"input {tensor.name!r}: shape {list(shape)} of {tensor.datatype} needs "
                                  f"{count * dtype.itemsize} bytes, got {len(raw[i])}", "wrong_shape")
                array = np.frombuffer(raw[i], dtype=dtype).reshape(shape)
            else:
                values = getattr(tensor.contents, _CONTENTS[tensor.datatype])
                if len(values) != count:
                    raise invalid(f"input {tensor.name!r}: shape {list(shape)} needs {count} values in "
                                  f"contents.{_CONTENTS[tensor.datatype]}, got {len(values)}", "wrong_shape")
                array = np.asarray(values, dtype=dtype).reshape(shape)
            feeds[tensor.name] = array
        missing = [n for n in expected if n not in feeds]
        if missing:
            raise invalid(f"model {model.name!r} needs input(s) {missing}", "missing_input")
        model.check_values(feeds[model.input_name], model.input_name)
        if "random" in feeds and model.is_policy:
            r = feeds["random"]
            # (0, 1]: the domain of the server's own draws (model_server.randomness), so any logged
            # decision can be replayed here.
            if r.shape[0] != feeds[model.input_name].shape[0] or not ((r > 0) & (r <= 1)).all():
                raise invalid("input 'random' needs one row per context row, with values in (0, 1]",
                              "wrong_shape")
        return feeds

    def _infer(self, model: LoadedModel, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """Decode, run and shape one inference (inline when small, in the pool when large)."""
        feeds = self._inputs(model, request)
        graph_outputs = [o.name for o in model.session.get_outputs()]
        wanted = [o.name for o in request.outputs] or graph_outputs
        unknown = [n for n in wanted if n not in graph_outputs]
        if unknown:
            raise not_found(f"model {model.name!r} has no output(s) {unknown} (outputs: {graph_outputs})",
                            "unknown_output")
        metrics = model.metrics.methods["ModelInfer"]
        t0 = time.perf_counter()
        results = model.run(feeds, wanted)
        metrics.latency.observe(time.perf_counter() - t0)
        metrics.requests.inc()
        metrics.batch.observe(feeds[model.input_name].shape[0])
        response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
        types = {o.name: o.type for o in model.session.get_outputs()}
        for name, value in zip(wanted, results, strict=True):
            datatype = {"tensor(float)": "FP32", "tensor(int64)": "INT64", "tensor(double)": "FP64",
                        "tensor(int32)": "INT32", "tensor(bool)": "BOOL"}[types[name]]
            array = np.ascontiguousarray(value, dtype=_DTYPES[datatype])
            response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
            response.raw_output_contents.append(array.tobytes())
        return response

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        model = None
        try:
            model = self.repository.get(request.model_name, request.model_version)
            rows = max((int(t.shape[0]) for t in request.inputs if len(t.shape)), default=0)
            if rows >= BATCH_ROWS:
                return await self.pool.run(lambda: self._infer(model, request), context.time_remaining())
            check_deadline(context)
            return self._infer(model, request)
        except RequestError as error:
            await refuse(context, error, request.model_name, model)
        except Exception as exc:
            await internal(context, exc, request.model_name, model, "ModelInfer")
        raise AssertionError("unreachable")


def registration(repository: ModelRepository, pool: BatchPool | None = None) -> ServiceRegistration:
    return ServiceRegistration(SERVICE_NAME, InferenceServicer(repository, pool),
                               pb_grpc.add_GRPCInferenceServiceServicer_to_server)
