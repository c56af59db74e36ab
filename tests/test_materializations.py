"""The materialization store interface, the same contract for every backend (memory, SQLite, real Redis),
and the resolver driving it: batched reads, first write wins, the stored variant is the one served."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from assignment_server.authoring.compiler import DEFAULT_CLIENT_SECRET, compile_folder
from client_sdk.local import LocalState
from protos.twofold.assignment.v1 import assignment_pb2 as pb
from protos.twofold.assignment.v1 import assignment_pb2_grpc as pb_grpc
from tests.redis_server import RedisServer
from tests.test_sticky_assignments import FLAG, PATIENT, STICKY, Server
from twofold.resolver import (
    STATE_MEDIA_TYPE,
    InMemoryMaterializations,
    MaterializationCache,
    MaterializationRecord,
    MaterializationStore,
    Resolver,
    ResolverState,
    open_store,
    resolve_steps,
)
from twofold.resolver.sticky import ReadKeys, WriteRecords

R = MaterializationRecord


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield server.url
    finally:
        server.kill()


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MaterializationStore]:
    if request.param == "redis":
        s = open_store(request.getfixturevalue("redis_url"), timeout=5)
        s._client.flushdb()  # type: ignore[attr-defined]
    else:
        s = open_store("memory" if request.param == "memory" else str(tmp_path / "m.sqlite"))
    try:
        yield s
    finally:
        s.close()


def test_store_contract_first_write_wins(store: MaterializationStore) -> None:
    assert store.read([("m", "u1"), ("m", "u2")]) == {}
    assert store.write([R("u1", "m", "r1", "a"), R("u1", "m")]) == {("m", "u1", "r1"): "a", ("m", "u1", ""): ""}
    # A later writer of the same key loses and learns the winner; a new rule of the key is added.
    assert store.write([R("u1", "m", "r1", "b"), R("u1", "m", "r2", "c")]) == {("m", "u1", "r1"): "a",
                                                                               ("m", "u1", "r2"): "c"}
    assert store.read([("m", "u1"), ("m", "u2"), ("other", "u1")]) == {("m", "u1"): {"r1": "a", "": "", "r2": "c"}}


def test_open_store_refuses_an_unknown_scheme() -> None:
    with pytest.raises(ValueError, match="unsupported materialization store s3://"):
        open_store("s3://bucket/x")


def _sticky_state() -> ResolverState:
    return ResolverState.from_json(compile_folder(_flags_dir()).state_json())


def _flags_dir() -> Path:
    folder = Path(tempfile.mkdtemp()) / "flags"
    folder.mkdir()
    (folder / "f.yaml").write_text(STICKY)
    return folder


def test_a_lost_insert_serves_the_stored_variant() -> None:
    """Another writer stores a variant between this resolve's read and its write: the resolve
    serves the stored variant, not the one it computed."""
    resolver = Resolver(_sticky_state())
    store = InMemoryMaterializations()
    steps = resolve_steps(resolver, [FLAG], {"targeting_key": "u1"}, DEFAULT_CLIENT_SECRET)
    read = next(steps)
    assert isinstance(read, ReadKeys) and read.keys == [("materializations/sticky-test--exp", "u1")]
    write = steps.send(store.read(read.keys))
    assert isinstance(write, WriteRecords) and len(write.records) == 1
    computed = write.records[0].variant
    other = next(v for v in (f"{FLAG}/variants/a", f"{FLAG}/variants/b") if v != computed)
    store.write([R("u1", write.records[0].materialization, write.records[0].rule, other)])  # the race
    with pytest.raises(StopIteration) as done:
        steps.send(store.write(write.records))
    assert done.value.value.flags[0].variant == other


def test_cached_entries_need_no_store_call() -> None:
    resolver = Resolver(_sticky_state())
    cache = MaterializationCache(10)
    store = InMemoryMaterializations()
    first = resolver.resolve_request([FLAG], {"targeting_key": "u1"}, DEFAULT_CLIENT_SECRET,
                                     materializations=store, cache=cache)
    steps = resolve_steps(resolver, [FLAG], {"targeting_key": "u1"}, DEFAULT_CLIENT_SECRET, cache)
    with pytest.raises(StopIteration) as done:
        next(steps)  # answered from the cache: no ReadKeys, no WriteRecords
    assert done.value.value.flags[0].variant == first.flags[0].variant


def test_cache_is_bounded_lru() -> None:
    cache = MaterializationCache(2)
    cache.learn(("m", "1"), {"r": "a"})
    cache.learn(("m", "2"), {"r": "a"})
    assert cache.get(("m", "1")) is not None  # 1 is now the most recent
    cache.learn(("m", "3"), {"r": "a"})
    assert len(cache) == 2 and cache.get(("m", "2")) is None and cache.get(("m", "1")) is not None


MULTI = "\n---\n".join(STICKY.replace("sticky-test", f"sticky-{i}") for i in range(3))


def test_one_batched_read_and_one_write_per_resolve(tmp_path: Path, redis_url: str) -> None:
    """Three sticky flags in one ResolveFlags: one store read (a pipeline), one write; a unit
    resolved again is answered from the pod's cache with no store call at all."""
    server = Server(tmp_path, "a", MULTI, redis_url, *PATIENT)
    try:
        def calls() -> tuple[float, float]:
            return (server.metric("twofold_assignment_materialization_calls_total", op="read", outcome="ok"),
                    server.metric("twofold_assignment_materialization_calls_total", op="write", outcome="ok"))

        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.FlagResolverServiceStub(channel)
            request = pb.ResolveFlagsRequest(flags=[f"flags/sticky-{i}" for i in range(3)],
                                             client_secret=DEFAULT_CLIENT_SECRET)
            request.evaluation_context.update({"targeting_key": "batch-unit"})
            before = calls()
            first = stub.ResolveFlags(request, timeout=10)
            after_first = calls()
            again = stub.ResolveFlags(request, timeout=10)
            after_again = calls()
    finally:
        server.stop()
    assert [f.reason for f in first.resolved_flags] == [pb.RESOLVE_REASON_MATCH] * 3
    assert (after_first[0] - before[0], after_first[1] - before[1]) == (1, 1)
    assert after_again == after_first
    assert [f.variant for f in again.resolved_flags] == [f.variant for f in first.resolved_flags]


def _state_with_materialized_segment() -> dict:
    """A compiled flag whose rule targets a materialized segment (a Confidence state feature)
    with no Bloom filter, beside a plain flag."""
    folder = Path(tempfile.mkdtemp())
    (folder / "f.yaml").write_text("flag: seg-test\nvariants: {a: {x: 1}}\nrules:\n"
                                   "  - name: r\n    when: {attribute: country, eq: SE}\n    serve: a\n"
                                   "---\nflag: plain\nvariants: {a: {x: 1}}\nrules:\n  - name: r\n    serve: a\n")
    doc = json.loads(compile_folder(folder).state_json())
    doc["segments"]["segments/seg-test--r"]["targeting"] = {
        "criteria": {"c1": {"materializedSegment": {"materializedSegment": "materializedSegments/vip"}}},
        "expression": {"ref": "c1"}}
    return doc


def test_local_evaluation_routes_store_needing_flags_to_the_server() -> None:
    """Sticky flags, and targeting on a materialized segment without a Bloom filter, need the store:
    resolved without one they are ERROR, so an SDK evaluating locally sends them to the server."""
    doc = _state_with_materialized_segment()
    state = ResolverState.from_dict(doc)
    assert state.flags_needing_store == {"flags/seg-test"}
    (flag,) = Resolver(state).resolve(["flags/seg-test"], {"targeting_key": "u", "country": "SE"},
                                      DEFAULT_CLIENT_SECRET)
    assert flag.reason.name == "ERROR"
    local = LocalState(DEFAULT_CLIENT_SECRET)
    assert local.load(pb.StateSnapshot(generation=1, format=STATE_MEDIA_TYPE, state=json.dumps(doc).encode()))
    assert local.needs_server(["seg-test", "plain"]) == ["seg-test"]
    assert _sticky_state().flags_needing_store == {FLAG}


def test_serve_refuses_an_unknown_store_scheme(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from assignment_server.cli import SERVE

    parser = argparse.ArgumentParser()
    SERVE.configure(parser)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--flags", "x", "--materializations", "s3://bucket/key"])
    assert exit_.value.code == 2 and "unsupported store s3://" in capsys.readouterr().err
    assert parser.parse_args(["--flags", "x", "--materializations", "rediss://h:6380/0"]).materializations \
        == "rediss://h:6380/0"


def test_redis_over_tls_with_the_password_from_the_environment(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`rediss://` with the CA in TWOFOLD_MATERIALIZATIONS_CA and the password in
    TWOFOLD_MATERIALIZATIONS_PASSWORD (the Kubernetes Secret's keys), against a TLS-only redis-server."""
    from tests.tls_certs import issue, make_ca

    ca, ca_key, ca_cert = make_ca()
    server_pem = issue(ca_key, ca_cert, "127.0.0.1", server=True)
    files = {}
    for name, data in (("server.crt", server_pem.cert), ("server.key", server_pem.key), ("ca.crt", ca.cert)):
        (tmp_path / name).write_bytes(data)
        files[name] = tmp_path / name
    server = RedisServer(tmp_path / "redis", tls=(files["server.crt"], files["server.key"], files["ca.crt"]),
                         password="s3cret-pw")
    try:
        assert server.url.startswith("rediss://")
        monkeypatch.setenv("TWOFOLD_MATERIALIZATIONS_CA", str(files["ca.crt"]))
        monkeypatch.setenv("TWOFOLD_MATERIALIZATIONS_PASSWORD", "s3cret-pw")
        store = open_store(server.url, timeout=5)
        try:
            assert store.write([R("u1", "m", "r", "a")]) == {("m", "u1", "r"): "a"}
            assert store.read([("m", "u1")]) == {("m", "u1"): {"r": "a"}}
            assert "s3cret" not in store.describe()
        finally:
            store.close()
        monkeypatch.delenv("TWOFOLD_MATERIALIZATIONS_PASSWORD")
        unauthenticated = open_store(server.url, timeout=5)
        try:
            with pytest.raises(redis.AuthenticationError):
                unauthenticated.read([("m", "u1")])
        finally:
            unauthenticated.close()
    finally:
        server.kill()
