"""The v1 contracts: generated modules import, and `inference` is wire-compatible with Triton's."""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor

from protos.inference import grpc_service_pb2

ROOT = Path(__file__).resolve().parent.parent

SERVICES = {
    "protos.twofold.assignment.v1.assignment_pb2": ("FlagResolverService",
                                                    {"ResolveFlags", "ApplyFlags", "TrackEvents", "WatchState"}),
    "protos.twofold.model.v1.model_pb2": ("ModelService", {"Predict", "Score", "Decide", "ListModels"}),
    "protos.twofold.analysis.v1.analysis_pb2": ("AnalysisService",
                                                {"ListExperiments", "GetResults", "ComputeFromStatistics"}),
    "protos.inference.grpc_service_pb2": ("GRPCInferenceService",
                                          {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                                           "ModelMetadata", "ModelInfer"}),
}


@pytest.mark.parametrize("module", sorted(SERVICES))
def test_services_declare_their_methods(module: str) -> None:
    pb2 = importlib.import_module(module)
    importlib.import_module(module + "_grpc")
    service_name, methods = SERVICES[module]
    service = pb2.DESCRIPTOR.services_by_name[service_name]
    assert {m.name for m in service.methods} == methods
    if "twofold" in module:
        assert pb2.DESCRIPTOR.package.startswith("twofold.") and pb2.DESCRIPTOR.package.endswith(".v1")


def _shape(descriptor: Descriptor) -> dict[str, object]:
    """Field name -> (number, type, label) for a message and its nested messages."""
    out: dict[str, object] = {f.name: [f.number, f.type, f.is_repeated] for f in descriptor.fields}
    for nested in descriptor.nested_types:
        if not nested.GetOptions().map_entry:
            out[nested.name] = _shape(nested)
    return out


# Runs in a separate process: tritonclient's stubs register the same `inference.*` names
# in the default descriptor pool, so the two cannot be imported together.
_TRITON_SIDE = """
import json, sys
from tritonclient.grpc import service_pb2 as s
def shape(d):
    out = {f.name: [f.number, f.type, f.is_repeated] for f in d.fields}
    for n in d.nested_types:
        if not n.GetOptions().map_entry:
            out[n.name] = shape(n)
    return out
names = json.loads(sys.argv[1])
req = s.ModelInferRequest(model_name="m", model_version="3", id="req-1")
i = req.inputs.add(name="input", datatype="FP32", shape=[2, 3])
i.parameters["p"].int64_param = 7
req.outputs.add(name="probabilities")
req.raw_input_contents.append(bytes(range(24)))
req.parameters["seq"].string_param = "s"
print(json.dumps({"shapes": {n: shape(s.DESCRIPTOR.message_types_by_name[n]) for n in names},
                  "request": req.SerializeToString().hex(),
                  "service": [m.name for m in s.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods]}))
"""


def test_inference_is_wire_compatible_with_tritonclient() -> None:
    # Only look for it: importing it here would clash with our own `inference` stubs.
    assert importlib.util.find_spec("tritonclient") is not None, "tritonclient[grpc] is a test dependency"
    names = sorted(grpc_service_pb2.DESCRIPTOR.message_types_by_name)
    result = subprocess.run([sys.executable, "-c", _TRITON_SIDE, json.dumps(names)],
                            capture_output=True, timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr.decode()
    theirs = json.loads(result.stdout)
    ours = {n: _shape(grpc_service_pb2.DESCRIPTOR.message_types_by_name[n]) for n in names}
    assert ours == theirs["shapes"]
    # Every method we declare exists in Triton's service under the same name.
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert {m.name for m in service.methods} <= set(theirs["service"])
    # A request serialized by tritonclient parses identically here.
    req = grpc_service_pb2.ModelInferRequest.FromString(bytes.fromhex(theirs["request"]))
    assert (req.model_name, req.model_version, req.id) == ("m", "3", "req-1")
    assert list(req.inputs[0].shape) == [2, 3] and req.inputs[0].parameters["p"].int64_param == 7
    assert req.raw_input_contents[0] == bytes(range(24))
    assert req.outputs[0].name == "probabilities" and req.parameters["seq"].string_param == "s"


def test_generation_is_reproducible(tmp_path: Path) -> None:
    """Regenerating into a copy of protos/ reproduces the committed modules byte for byte."""
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "protos", copy / "protos", ignore=shutil.ignore_patterns("__pycache__"))
    before = {p.relative_to(copy): p.read_bytes() for p in (copy / "protos").rglob("*") if p.is_file()}
    for path in (copy / "protos").rglob("*_pb2*"):
        path.unlink()
    result = subprocess.run([sys.executable, "-m", "protos.generate"], cwd=copy, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    after = {p.relative_to(copy): p.read_bytes() for p in (copy / "protos").rglob("*") if p.is_file()
             and "__pycache__" not in p.parts}
    assert after == before
