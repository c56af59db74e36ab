"""Local evaluation's per-flag plans and the exposure queue's fast path (issue 18).

A planned resolve must give exactly what the general local path gives (which test_sdk_client
checks against the real server), a new state must replace every plan, values handed out must
stay private, and deduplication must stay exact with many threads applying at once.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest

from assignment_server.authoring.compiler import compile_folder
from client_sdk import ClientOptions, ErrorCode, FlagResult, Reason
from client_sdk.core import ClientCore
from client_sdk.local import LocalState
from client_sdk.results import local_flag_result
from protos.twofold.assignment.v1 import assignment_pb2 as apb

SECRET = "test-secret"
FLAGS = """\
flag: checkout
variants:
  red: {color: red, discount: 10}
  green: {color: green, discount: 0}
  blue: {color: blue, nested: {tags: [a, b]}}
rules:
  - name: nordics
    when: {attribute: country, in: [SE, NO]}
    experiment: {allocation: 80%, arms: {red: 33, green: 33, blue: 34}}
---
flag: banner
variants:
  wide: {layout: wide}
rules:
  - name: web
    when: {segment: web}
    serve: wide
---
segment: web
when: {attribute: platform, eq: web}
---
flag: sticky-test
variants: {a: {x: 1}, b: {x: 2}}
rules:
  - name: sticky
    experiment: {allocation: 100%, arms: {a: 1, b: 1}, sticky: true}
---
flag: hidden
clients: [other]
variants: {a: {x: 1}}
rules:
  - name: all
    serve: a
---
client: backend
secrets:
  - secret: test-secret
---
client: other
secrets:
  - secret: other-secret
"""


def _snapshot(tmp_path: Path, text: str, generation: int) -> apb.StateSnapshot:
    folder = tmp_path / f"flags-{generation}"
    folder.mkdir()
    (folder / "flags.yaml").write_text(text)
    return apb.StateSnapshot(generation=generation, state=compile_folder(folder).state_json())


def _loaded(tmp_path: Path, text: str = FLAGS) -> LocalState:
    local = LocalState(SECRET)
    assert local.load(_snapshot(tmp_path, text, 1))
    return local


def _same(a: FlagResult, b: FlagResult) -> bool:
    """Equal in every field but the resolve id (unique per resolve)."""
    return dataclasses.replace(a, resolve_id="") == dataclasses.replace(b, resolve_id="")


CONTEXTS = [{"country": c, "platform": p} for c in ("SE", "NO", "US") for p in ("web", "ios")] + \
    [{}, {"country": "SE", "targeting_key": "overridden"}]


def test_planned_resolve_gives_what_the_general_local_path_gives(tmp_path: Path) -> None:
    local = _loaded(tmp_path)
    core = ClientCore(SECRET, ClientOptions(flush_at_exit=False))
    seen = set()
    for i in range(600):
        unit = f"user-{i}"
        for context in CONTEXTS:
            for flag in ("checkout", "flags/checkout", "banner"):
                planned = core.resolve_planned(local, flag, unit, context, "dflt")
                general = core.resolve_locally(local, [flag.removeprefix("flags/")], unit, context,
                                               {flag.removeprefix("flags/"): "dflt"})
                assert planned is not None and _same(planned, general[flag.removeprefix("flags/")])
                assert planned.local and planned.resolve_id and planned.resolve_id != general[planned.flag].resolve_id
                seen.add((planned.flag, planned.reason, planned.variant))
    # Every outcome occurred: each arm, no match (with the caller's default), the segment rule.
    assert {v for f, r, v in seen if f == "checkout" and r is Reason.MATCH} == {"red", "green", "blue"}
    assert ("checkout", Reason.NO_SEGMENT_MATCH, None) in seen and ("banner", Reason.MATCH, "wide") in seen
    # A unit that is not a string: the resolver's targeting-key error, as on the general path.
    bad = core.resolve_planned(local, "checkout", 1.5, {"country": "SE"}, "dflt")  # type: ignore[arg-type]
    assert bad is not None and (bad.reason, bad.error_code, bad.value) == \
        (Reason.TARGETING_KEY_ERROR, ErrorCode.TARGETING_KEY_MISSING, "dflt")
    assert _same(bad, core.resolve_locally(local, ["checkout"], 1.5, {"country": "SE"}, {"checkout": "dflt"})[
        "checkout"])  # type: ignore[arg-type]


def test_no_plan_where_the_general_path_must_answer(tmp_path: Path) -> None:
    local = _loaded(tmp_path)
    core = ClientCore(SECRET, ClientOptions(flush_at_exit=False))
    # Sticky (needs the server's store), another client's flag, an unknown flag: the general path.
    for flag in ("sticky-test", "hidden", "nope"):
        assert core.resolve_planned(local, flag, "u", {}, None) is None
    assert core.resolve_locally(local, ["hidden"], "u", {}, {})["hidden"].error_code is ErrorCode.FLAG_NOT_FOUND
    # No state yet, or a secret the state does not know: no plans either.
    assert core.resolve_planned(LocalState(SECRET), "checkout", "u", {}, None) is None
    stranger = LocalState("unknown-secret")
    assert stranger.load(_snapshot(tmp_path, FLAGS, 7))
    assert core.resolve_planned(stranger, "checkout", "u", {}, None) is None


def test_a_new_state_replaces_every_plan(tmp_path: Path) -> None:
    local = _loaded(tmp_path)
    core = ClientCore(SECRET, ClientOptions(flush_at_exit=False))
    before = core.resolve_planned(local, "checkout", "user-1", {"country": "SE"}, None)
    assert before is not None and before.value["color"] in ("red", "green", "blue")
    changed = FLAGS.replace("color: red", "color: crimson").replace("color: green", "color: lime") \
        .replace("color: blue", "color: navy")
    # checkout now sticky (server-only), banner gone: no stale plan may survive the swap.
    changed = changed.replace("experiment: {allocation: 80%, arms: {red: 33, green: 33, blue: 34}}",
                              "experiment: {allocation: 80%, arms: {red: 33, green: 33, blue: 34}, sticky: true}")
    changed = changed.replace("flag: banner", "flag: banner-v2")
    assert local.load(_snapshot(tmp_path, FLAGS.replace("color: red", "color: crimson")
                                .replace("color: green", "color: lime").replace("color: blue", "color: navy"), 2))
    after = core.resolve_planned(local, "checkout", "user-1", {"country": "SE"}, None)
    assert after is not None and after.variant == before.variant
    assert after.value["color"] == {"red": "crimson", "green": "lime", "blue": "navy"}[before.variant]
    assert local.load(_snapshot(tmp_path, changed, 3))
    assert core.resolve_planned(local, "checkout", "user-1", {"country": "SE"}, None) is None
    assert core.resolve_planned(local, "banner", "user-1", {"platform": "web"}, None) is None
    assert core.resolve_planned(local, "banner-v2", "user-1", {"platform": "web"}, None).variant == "wide"
    # A snapshot that fails to load keeps the previous plans serving.
    assert not local.load(apb.StateSnapshot(generation=4, state=b"{not json"))
    assert core.resolve_planned(local, "banner-v2", "user-1", {"platform": "web"}, None).variant == "wide"


def test_values_handed_out_are_private(tmp_path: Path) -> None:
    local = _loaded(tmp_path)
    core = ClientCore(SECRET, ClientOptions(flush_at_exit=False))
    units = {}
    for i in range(200):  # a unit in each arm
        r = core.resolve_planned(local, "checkout", f"u{i}", {"country": "SE"}, None)
        if r.variant:
            units.setdefault(r.variant, f"u{i}")
    for variant, unit in units.items():
        first = core.resolve_planned(local, "checkout", unit, {"country": "SE"}, None)
        pristine = {"red": {"color": "red", "discount": 10}, "green": {"color": "green", "discount": 0},
                    "blue": {"color": "blue", "nested": {"tags": ["a", "b"]}}}[variant]
        assert first.value == pristine
        first.value["color"] = "mutated"
        first.value.get("nested", {}).get("tags", []).append("mutated")
        assert core.resolve_planned(local, "checkout", unit, {"country": "SE"}, None).value == pristine
    # Unless asked not to copy (a caller that only reads): then the state's own object, read-only.
    shared = core.resolve_planned(local, "checkout", units["blue"], {"country": "SE"}, None, copy_value=False)
    assert shared.value is local.plan("checkout").flag.variants[next(
        v for v in local.plan("checkout").flag.variants if v.endswith("/blue"))]


def test_fast_result_constructor_equals_the_dataclass() -> None:
    fields = dict(flag="f", unit="u", value={"a": 1}, variant="v", reason=Reason.MATCH, error_code=None,
                  error_message=None, rule="r", segment="s", assignment_id="a", resolve_id="id", should_apply=True)
    fast = local_flag_result(*fields.values())
    assert type(fast) is FlagResult and fast == FlagResult(**fields, local=True, resolve_token=b"")
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.unit = "other"  # type: ignore[misc]
    assert [f.name for f in dataclasses.fields(FlagResult)] == [*fields, "local", "resolve_token"]


def test_resolve_ids_are_unique_per_resolve_and_per_client(tmp_path: Path) -> None:
    local = _loaded(tmp_path)
    a, b = (ClientCore(SECRET, ClientOptions(flush_at_exit=False)) for _ in range(2))
    ids = [c.resolve_planned(local, "checkout", "u", {}, None).resolve_id for c in (a, b) for _ in range(1000)]
    assert len(set(ids)) == 2000 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_dedup_stays_exact_with_threads_applying_at_once(tmp_path: Path) -> None:
    local = _loaded(tmp_path)
    core = ClientCore(SECRET, ClientOptions(flush_at_exit=False, batch_size=10**5, max_buffered=10**6))
    results = [core.resolve_planned(local, "checkout", f"u{i}", {"country": "SE"}, None) for i in range(3000)]
    exposed = [r for r in results if r.should_apply]
    assert len(exposed) > 2000
    barrier = threading.Barrier(8)
    queued = [0] * 8

    def apply_all(n: int) -> None:
        barrier.wait()
        for r in exposed[n::2] + exposed:  # every result several times, from every thread, interleaved
            queued[n] += core.exposures.add(r)

    threads = [threading.Thread(target=apply_all, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(queued) == len(exposed) == core.stats.exposures_queued
    calls = sum(len(exposed[n::2]) + len(exposed) for n in range(8))
    assert core.stats.exposures_deduplicated == calls - len(exposed)
    records = [la for request in core.exposures.drain(SECRET) for la in request.local_assignments]
    assert sorted((la.unit, la.variant, la.resolve_id) for la in records) == \
        sorted((r.unit, r.variant, r.resolve_id) for r in exposed)
    assert all(la.flag == "flags/checkout" and la.rule.endswith("/rules/nordics") and la.apply_time.seconds > 0
               for la in records)


def test_requeued_local_exposures_keep_their_fields(tmp_path: Path) -> None:
    local = _loaded(tmp_path)
    core = ClientCore(SECRET, ClientOptions(flush_at_exit=False))
    result = core.resolve_planned(local, "checkout", "u1", {"country": "SE"}, None)
    assert result.should_apply and core.exposures.add(result, now_ns=1_700_000_000_123_456_789)
    (request,) = core.exposures.drain(SECRET)
    core.exposures.requeue(request)
    (again,) = core.exposures.drain(SECRET)
    assert again.local_assignments == request.local_assignments
    la = again.local_assignments[0]
    assert (la.apply_time.seconds, la.apply_time.nanos) == (1_700_000_000, 123_456_789)
    assert (la.unit, la.variant, la.assignment_id, la.resolve_id) == \
        ("u1", result.variant, result.assignment_id, result.resolve_id)


def test_local_answers_stay_out_of_the_stale_cache(tmp_path: Path) -> None:
    """The stale cache serves failed ResolveFlags calls; local answers need no server, and keeping
    up to 100k of them made every local resolve slower than the resolver itself (issue 18)."""
    local = _loaded(tmp_path)
    core = ClientCore(SECRET, ClientOptions(flush_at_exit=False))
    for i in range(50):
        assert core.resolve_planned(local, "checkout", f"u{i}", {"country": "SE"}, None) is not None
        core.resolve_locally(local, ["checkout", "banner"], f"u{i}", {"country": "SE", "platform": "web"}, {})
    assert len(core._last_known) == 0
    response = apb.ResolveFlagsResponse(resolve_id="r1", resolve_token=b"t", resolved_flags=[apb.ResolvedFlag(
        flag="flags/checkout", variant="flags/checkout/variants/red", reason=apb.RESOLVE_REASON_MATCH,
        should_apply=True)])
    response.resolved_flags[0].value.update({"color": "red"})
    assert core.resolved(response, "u1", ["checkout"], {})["checkout"].variant == "red"
    assert len(core._last_known) == 1  # a remote answer is kept for STALE, as before
