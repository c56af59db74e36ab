"""Open Inference Protocol: tritonclient[grpc] (in its own process) against our server."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from model_server.runtime import session_options
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.model.conftest import Repo, Server, make_data

# tritonclient registers its own `inference.*` protobuf names: it cannot share our process.
TRITON_SIDE = r"""
import json, sys
import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

target, x_json, ctx_json, rnd_json = sys.argv[1:5]
client = tc.InferenceServerClient(url=target)
out = {"live": client.is_server_live(), "ready": client.is_server_ready(),
       "model_ready": client.is_model_ready("ranker"), "missing_ready": client.is_model_ready("nope"),
       "server": client.get_server_metadata(as_json=True),
       "meta": client.get_model_metadata("ranker", as_json=True),
       "bandit_meta": client.get_model_metadata("linucb", as_json=True)}
x = np.array(json.loads(x_json), dtype=np.float32)
inp = tc.InferInput("input", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
result = client.infer("ranker", [inp], outputs=[tc.InferRequestedOutput("probabilities"),
                                               tc.InferRequestedOutput("label")], request_id="r-1")
out["probabilities"] = result.as_numpy("probabilities").tolist()
out["label"] = result.as_numpy("label").tolist()
out["response"] = result.get_response(as_json=True)
ctx = tc.InferInput("context", [1, 3], "FP32")
ctx.set_data_from_numpy(np.array(json.loads(ctx_json), dtype=np.float32))
rnd = tc.InferInput("random", [1, 1], "FP32")
rnd.set_data_from_numpy(np.array(json.loads(rnd_json), dtype=np.float32))
bandit = client.infer("linucb", [ctx, rnd], model_version="1")
out["bandit"] = {k: bandit.as_numpy(k).tolist() for k in ("scores", "probabilities", "arm", "propensity")}
errors = {}
for case, build in {
    "fp64": lambda: [tc.InferInput("input", [1, 6], "FP64")],
    "shape": lambda: [tc.InferInput("input", [1, 4], "FP32")],
}.items():
    inputs = build()
    inputs[0].set_data_from_numpy(np.zeros(inputs[0].shape(), dtype=np.float64 if case == "fp64" else np.float32))
    try:
        client.infer("ranker", inputs)
        errors[case] = None
    except InferenceServerException as exc:
        errors[case] = [exc.status(), exc.message()]
try:
    client.infer("nope", [inp])
except InferenceServerException as exc:
    errors["unknown"] = [exc.status(), exc.message()]
out["errors"] = errors
print(json.dumps(out))
"""


def test_tritonclient_health_metadata_and_infer(server: Server, model_repo: Repo) -> None:
    x, _ = make_data(8, seed=41)
    x[0, 1] = np.nan
    ctx = [[0.5, -1.0, 1.0]]
    rnd = [[0.731]]
    proc = subprocess.run([sys.executable, "-c", TRITON_SIDE, server.target,
                           json.dumps(np.where(np.isnan(x), None, x).tolist()).replace("null", "NaN"),
                           json.dumps(ctx), json.dumps(rnd)], capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["live"] and out["ready"] and out["model_ready"] and not out["missing_ready"]
    assert out["server"]["name"] == "twofold-model-server"
    meta = out["meta"]
    assert meta["name"] == "ranker" and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "6"]}]
    assert {o["name"] for o in meta["outputs"]} == {"label", "probabilities"}
    assert [i["name"] for i in out["bandit_meta"]["inputs"]] == ["context", "random"]
    session = ort.InferenceSession(str(model_repo.root / "ranker" / "1" / "model.onnx"), session_options())
    label, probabilities = session.run(["label", "probabilities"], {"input": x})
    np.testing.assert_array_equal(np.array(out["probabilities"], dtype=np.float32), probabilities)
    np.testing.assert_array_equal(np.array(out["label"]), label)
    assert out["response"]["id"] == "r-1" and out["response"]["model_version"] == "1"
    policy = ort.InferenceSession(str(model_repo.root / "linucb" / "1" / "model.onnx"), session_options())
    expected = policy.run(["scores", "probabilities", "arm", "propensity"],
                          {"context": np.array(ctx, dtype=np.float32), "random": np.array(rnd, dtype=np.float32)})
    for name, value in zip(("scores", "probabilities", "arm", "propensity"), expected, strict=True):
        np.testing.assert_array_equal(np.array(out["bandit"][name], dtype=value.dtype), value)
    errors = out["errors"]
    assert errors["fp64"][0] == "StatusCode.INVALID_ARGUMENT" and "must be FP32, got FP64" in errors["fp64"][1]
    assert errors["shape"][0] == "StatusCode.INVALID_ARGUMENT" and "must have shape [-1, 6]" in errors["shape"][1]
    assert errors["unknown"][0] == "StatusCode.NOT_FOUND" and "unknown model 'nope'" in errors["unknown"][1]


@pytest.fixture(scope="module")
def oip(server: Server) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def test_typed_contents_and_bad_oip_requests(oip: pb_grpc.GRPCInferenceServiceStub, model_repo: Repo) -> None:
    x, _ = make_data(2, seed=42)
    request = pb.ModelInferRequest(model_name="ranker")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[2, 6])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    response = oip.ModelInfer(request)
    assert [o.name for o in response.outputs] == ["label", "probabilities"]
    probabilities = np.frombuffer(response.raw_output_contents[1], dtype="<f4").reshape(2, 2)
    session = ort.InferenceSession(str(model_repo.root / "ranker" / "1" / "model.onnx"), session_options())
    np.testing.assert_array_equal(probabilities, session.run(["probabilities"], {"input": x})[0])
    bad = [
        (pb.ModelInferRequest(model_name="linucb", inputs=[pb.ModelInferRequest.InferInputTensor(
            name="context", datatype="FP32", shape=[1, 3])], raw_input_contents=[np.zeros(3, "<f4").tobytes()]),
         grpc.StatusCode.INVALID_ARGUMENT, "needs input(s) ['random']"),
        (pb.ModelInferRequest(model_name="linucb", inputs=[
            pb.ModelInferRequest.InferInputTensor(name="context", datatype="FP32", shape=[1, 3]),
            pb.ModelInferRequest.InferInputTensor(name="random", datatype="FP32", shape=[1, 1])],
            raw_input_contents=[np.zeros(3, "<f4").tobytes(), np.zeros(1, "<f4").tobytes()]),
         grpc.StatusCode.INVALID_ARGUMENT, "with values in (0, 1]"),
        (pb.ModelInferRequest(model_name="ranker", inputs=[pb.ModelInferRequest.InferInputTensor(
            name="input", datatype="FP32", shape=[1, 6])], raw_input_contents=[b"\0" * 8]),
         grpc.StatusCode.INVALID_ARGUMENT, "needs 24 bytes, got 8"),
        (pb.ModelInferRequest(model_name="ranker", inputs=[pb.ModelInferRequest.InferInputTensor(
            name="input", datatype="FP32", shape=[1, 6])], raw_input_contents=[np.zeros(6, "<f4").tobytes()],
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="logits")]),
         grpc.StatusCode.NOT_FOUND, "no output(s) ['logits']"),
    ]
    for request_, code, message in bad:
        with pytest.raises(grpc.RpcError) as err:
            oip.ModelInfer(request_, timeout=5)
        assert err.value.code() == code and message in err.value.details(), err.value.details()
    # 1.0 is a value the server's own draws can take (once in 2**24), so a logged decision with it replays here.
    replay = oip.ModelInfer(pb.ModelInferRequest(model_name="linucb", inputs=[
        pb.ModelInferRequest.InferInputTensor(name="context", datatype="FP32", shape=[1, 3]),
        pb.ModelInferRequest.InferInputTensor(name="random", datatype="FP32", shape=[1, 1])],
        raw_input_contents=[np.zeros(3, "<f4").tobytes(), np.ones(1, "<f4").tobytes()],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in ("arm", "propensity")]))
    arm = int(np.frombuffer(replay.raw_output_contents[0], dtype="<i8")[0])
    assert 0 <= arm < 3 and np.frombuffer(replay.raw_output_contents[1], dtype="<f4")[0] > 0
    assert oip.ModelReady(pb.ModelReadyRequest(name="ranker", version="1")).ready
    assert not oip.ModelReady(pb.ModelReadyRequest(name="ranker", version="7")).ready
    with pytest.raises(grpc.RpcError) as err:
        oip.ModelMetadata(pb.ModelMetadataRequest(name="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
