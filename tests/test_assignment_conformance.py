"""The Confidence resolver specification: every case of tests.json against state.json, one by one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from assignment_server.conformance import load_cases, run_case
from tests.spec_data import CONFORMANCE_DIR
from twofold.resolver import ResolverState, allocation_bucket, allocation_salt, bucket

ROOT = Path(__file__).resolve().parent.parent


SPEC = CONFORMANCE_DIR
CASES = load_cases(SPEC / "tests.json")
assert CASES, f"no conformance cases in {SPEC / 'tests.json'}"


@pytest.fixture(scope="module")
def spec_state() -> ResolverState:
    return ResolverState.from_json((SPEC / "state.json").read_bytes())


def test_bucketing_vectors_of_contract_1() -> None:
    assert bucket("MegaSalt-confidence-test|roug", 1_000_000) == 567493
    assert bucket("country-se|user1", 1000) == 719
    assert allocation_bucket(allocation_salt("accounts/confidence-test"), "roug") == 567493


@pytest.mark.skipif(not CASES, reason="conformance data not present")
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_confidence_spec_case(spec_state: ResolverState, case: dict) -> None:
    result = run_case(spec_state, case)
    assert result.passed, "; ".join(result.problems)


@pytest.mark.skipif(not CASES, reason="conformance data not present")
def test_conformance_command_reports_and_fails_on_a_broken_expectation(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "twofold", "conformance", "confidence",
           "--state", str(SPEC / "state.json"), "--tests"]
    ok = subprocess.run([*cmd, str(SPEC / "tests.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.strip().splitlines()[-1] == f"{len(CASES)} passed, 0 failed"

    broken = [c for c in json.loads((SPEC / "tests.json").read_text())
              if c["expectedResult"]["general"]["resolvedFlags"]][:3]
    broken[0]["expectedResult"]["general"]["resolvedFlags"][0]["variant"] = "not-the-variant"
    (tmp_path / "tests.json").write_text(json.dumps(broken))
    bad = subprocess.run([*cmd, str(tmp_path / "tests.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert bad.stdout.strip().splitlines()[-1] == "2 passed, 1 failed"
    assert broken[0]["name"] in bad.stdout


def test_resolver_core_imports_without_grpc_or_server_code() -> None:
    """The SDK evaluates locally with the core: it must not drag in gRPC, protobuf or the server."""
    code = ("import sys, twofold.resolver\n"
            "heavy = [m for m in ('grpc', 'google.protobuf', 'assignment_server.service', 'numpy', 'yaml')"
            " if m in sys.modules]\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _as_protobuf_json(spec: dict) -> dict:
    """The same state in the protobuf-JSON layout of Confidence's ResolverState message."""
    import base64
    import gzip

    from twofold.resolver import Bitset

    bitsets = []
    for segment, value in spec["bitsets"].items():
        if value == "ALL":
            bitsets.append({"segment": segment, "fullBitset": True})
        else:
            bits = Bitset.from_indices(value).bits
            bitsets.append({"segment": segment, "gzippedBitset": base64.b64encode(gzip.compress(bits)).decode()})
    clients = [entry["client"] for entry in spec["clients"].values()]
    credentials = [entry["clientCredential"] for entry in spec["clients"].values()]
    return {"account": spec["account"], "flags": list(spec["flags"].values()),
            "segmentsNoBitsets": list(spec["segments"].values()), "bitsets": bitsets,
            "bloomFilters": spec["bloomFilters"], "clients": clients, "clientCredentials": credentials}


@pytest.mark.skipif(not CASES, reason="conformance data not present")
def test_protobuf_json_layout_resolves_identically() -> None:
    spec = json.loads((SPEC / "state.json").read_text())
    state = ResolverState.from_json(json.dumps(_as_protobuf_json(spec)))
    failures = [r for r in (run_case(state, case) for case in CASES) if not r.passed]
    assert not failures, failures[:3]
