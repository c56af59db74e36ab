"""No flag change moves a unit of a running experiment: out of its arm, or into an exclusive partner.

The property test drives the server's own reload path (`StateSource`) through seeded random
sequences of edits of a flags folder (ramps up and down, new exclusive experiments, removals,
holdouts, new arm weights, rules slipped in ahead, new exclusivity between running experiments,
restarts, and `twofold flags lock` run only now and then), and checks each served state with the
real resolver on many units against everything served before.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from assignment_server.authoring.compiler import DEFAULT_CLIENT_SECRET, compile_folder
from assignment_server.authoring.errors import FlagFileError
from assignment_server.state_source import StateSource
from tests.test_assignment_server import Harness
from twofold.cli import main as twofold_main
from twofold.resolver import Resolver, ResolverState
from twofold.testing import BackgroundLoop

UNITS = [f"u{i}" for i in range(5000)]
SEQUENCES = 8
MIN_SEQUENCES = 3
BUDGET_SECONDS = 45.0
EDITS = 10
NAMESPACES = ("ns", "other")
HOLDOUT = "holdout"  # the key under which holdout membership is tracked, per namespace


@dataclass
class Exp:
    name: str
    allocation: int  # percent
    namespace: str | None
    exclusive_with: list[str] = field(default_factory=list)
    weights: tuple[int, int] = (1, 1)
    ahead: bool = False  # a rollout rule placed ahead of the experiment in its flag

    @property
    def ident(self) -> str:
        return f"{self.name}/exp"


@dataclass
class Folder:
    """The author's model of the folder: what the YAML files say."""

    experiments: dict[str, Exp]
    holdouts: dict[str, int]  # namespace -> percent (0: none)
    counter: int = 0

    def copy(self) -> Folder:
        return Folder({k: Exp(**{**vars(v), "exclusive_with": list(v.exclusive_with)})
                       for k, v in self.experiments.items()}, dict(self.holdouts), self.counter)

    def partners(self, key: str) -> set[str]:
        """Keys (experiment names, or `holdout:<ns>`) that must never share a unit with `key`."""
        if key.startswith(HOLDOUT):
            ns = key.split(":")[1]
            return {e.name for e in self.experiments.values() if e.namespace == ns}
        e = self.experiments[key]
        out = {o.name for o in self.experiments.values() if o.name != e.name and e.namespace
               and o.namespace == e.namespace}
        out |= {o.name for o in self.experiments.values() if o.ident in e.exclusive_with or e.ident in o.exclusive_with}
        if e.namespace and self.holdouts.get(e.namespace):
            out.add(f"{HOLDOUT}:{e.namespace}")
        return out

    def write(self, folder: Path) -> None:
        for p in folder.glob("*.yaml"):
            p.unlink()
        ns_docs = []
        for ns in NAMESPACES:
            ns_docs.append(f"namespace: {ns}\n" + (f"holdout: {self.holdouts[ns]}%\n" if self.holdouts.get(ns) else ""))
        (folder / "namespaces.yaml").write_text("---\n".join(ns_docs))
        for e in self.experiments.values():
            ahead = "  - name: early\n    rollout: {variant: c, percentage: 10%}\n" if e.ahead else ""
            extra = f", namespace: {e.namespace}" if e.namespace else ""
            if e.exclusive_with:
                extra += f", exclusive_with: [{', '.join(e.exclusive_with)}]"
            (folder / f"{e.name}.yaml").write_text(
                f"flag: {e.name}\nvariants: {{a: {{x: 1}}, b: {{x: 2}}, c: {{x: 3}}}}\nrules:\n{ahead}"
                f"  - name: exp\n    experiment: {{allocation: {e.allocation}%, arms: {{a: {e.weights[0]}, "
                f"b: {e.weights[1]}}}{extra}}}\n")


def _edit(rng: random.Random, f: Folder) -> tuple[Folder, str]:
    """One random edit of the folder, as an author would make it."""
    g = f.copy()
    names = sorted(g.experiments)
    removable = [n for n in names if n != "probe"]
    kind = rng.choice(["ramp", "ramp", "ramp", "new", "new", "remove", "holdout", "weights", "ahead",
                       "make-exclusive"])
    if kind == "ramp" or (kind == "remove" and not removable):
        e = g.experiments[rng.choice(names)]
        e.allocation = max(1, min(60, e.allocation + rng.choice([-15, -10, -5, 5, 10, 20, 30])))
        return g, f"ramp {e.name} to {e.allocation}%"
    if kind == "new":
        g.counter += 1
        name = f"e{g.counter}"
        if rng.random() < 0.6:
            g.experiments[name] = Exp(name, rng.choice([5, 10, 15]), rng.choice(NAMESPACES))
        else:
            target = g.experiments[rng.choice(names)]
            g.experiments[name] = Exp(name, rng.choice([5, 10]), None, [target.ident])
        return g, f"new {name}"
    if kind == "remove":
        name = rng.choice(removable)
        del g.experiments[name]
        for e in g.experiments.values():
            e.exclusive_with = [x for x in e.exclusive_with if x != f"{name}/exp"]
        return g, f"remove {name}"
    if kind == "holdout":
        ns = rng.choice(NAMESPACES)
        g.holdouts[ns] = rng.choice([0, 2, 5, 10])
        return g, f"holdout {ns} {g.holdouts[ns]}%"
    e = g.experiments[rng.choice(names)]
    if kind == "weights":
        e.weights = (1, rng.choice([2, 3]))
        return g, f"reweight {e.name}"
    if kind == "ahead":
        e.ahead = True
        return g, f"rule ahead of {e.name}"
    others = [o for o in names if o != e.name and g.experiments[o].namespace != e.namespace
              and g.experiments[o].ident not in e.exclusive_with]
    if not others:
        return g, "nothing"
    e.exclusive_with.append(g.experiments[rng.choice(others)].ident)
    return g, f"make {e.name} exclusive"


def _observe(state: ResolverState, f: Folder) -> dict[str, np.ndarray]:
    """Per experiment name (and `holdout:<ns>`): each unit's arm, 0 when not in it."""
    resolver = Resolver(state)
    flags = [f"flags/{n}" for n in sorted(f.experiments)]
    seen = {n: np.zeros(len(UNITS), dtype=np.int8) for n in f.experiments}
    seen.update({f"{HOLDOUT}:{ns}": np.zeros(len(UNITS), dtype=np.int8) for ns in NAMESPACES})
    for i, unit in enumerate(UNITS):
        for r in resolver.resolve(flags, {"targeting_key": unit}, DEFAULT_CLIENT_SECRET):
            name = r.flag.rpartition("/")[2]
            rule = r.rule.rpartition("/")[2]
            if rule == "exp" and r.variant:
                seen[name][i] = ord(r.variant_name)
            elif rule.startswith("holdout--"):
                seen[f"{HOLDOUT}:{rule.split('--')[1]}"][i] = 1
    return seen


def _check(before: Folder, after: Folder, prev: dict[str, np.ndarray], now: dict[str, np.ndarray],
           history: dict[str, np.ndarray], step: str) -> None:
    """The guarantees, on every unit, for one served change (and update the history)."""
    running = {k for k in now if k in prev and (not k.startswith(HOLDOUT) or after.holdouts.get(k.split(":")[1]))
               and (k.startswith(HOLDOUT) or k in after.experiments)}
    for key in list(history):
        if key not in running:
            del history[key]  # ended: its units are free to go anywhere
    for key in running:
        was, is_ = prev[key], now[key]
        ever = history.setdefault(key, was.copy())
        both = (ever != 0) & (is_ != 0)
        assert (ever[both] == is_[both]).all(), f"{step}: units of {key} changed arm"
        if not key.startswith(HOLDOUT):
            shrunk = after.experiments[key].allocation < before.experiments[key].allocation
            if not shrunk:
                assert not ((was != 0) & (is_ == 0)).any(), f"{step}: units left {key} though it did not ramp down"
        for partner in after.partners(key) & set(now):
            assert not ((ever != 0) & (now[partner] != 0)).any(), \
                f"{step}: a unit of running {key} entered {partner}, which is exclusive with it"
        np.copyto(ever, np.where(ever == 0, is_, ever))


def _run_sequence(seed: int, tmp: Path, stats: dict[str, int]) -> None:
    rng = random.Random(seed)
    folder = tmp / f"flags-{seed}"
    folder.mkdir()
    record = tmp / f"served-{seed}.json"
    authored = Folder({"probe": Exp("probe", 2, "ns"), "e0": Exp("e0", 20, "ns"), "solo": Exp("solo", 30, None)},
                      {"ns": 0, "other": 0}, counter=0)
    authored.write(folder)
    source = StateSource(folder, poll_interval=0, served_lock=record)
    source.load_initial()
    served = authored.copy()
    prev = _observe(source.current.state, served)
    history: dict[str, np.ndarray] = {}
    for _ in range(EDITS):
        authored, step = _edit(rng, authored)
        authored.write(folder)
        if rng.random() < 0.25:  # the author sometimes runs `twofold flags lock`
            stats["lock runs"] += twofold_main(["flags", "lock", str(folder)]) == 0
        if rng.random() < 0.15:  # and the server sometimes restarts in between
            source = StateSource(folder, poll_interval=0, served_lock=record)
            try:
                source.load_initial()
            except FlagFileError:  # a change made while it was down that would move units: it stays down
                stats["refused at restart"] += 1
                authored = served.copy()
                authored.write(folder)
                source = StateSource(folder, poll_interval=0, served_lock=record)
                source.load_initial()
        else:
            generation = source.current.generation
            asyncio.run(source.reload_if_changed())
            if source.current.generation == generation:
                stats["refused"] += 1
                authored = served.copy()  # the author reads the refusal and reverts
                authored.write(folder)
                continue
        stats["accepted"] += 1
        now = _observe(source.current.state, authored)
        _check(served, authored, prev, now, history, f"seed {seed}, {step}")
        stats["units checked"] += len(UNITS)
        served, prev = authored.copy(), now


def test_no_edit_sequence_moves_units_of_running_experiments(tmp_path: Path) -> None:
    stats = dict.fromkeys(["sequences", "accepted", "refused", "refused at restart", "lock runs", "units checked"], 0)
    started = time.monotonic()
    for seed in range(SEQUENCES):
        if seed >= MIN_SEQUENCES and time.monotonic() - started > BUDGET_SECONDS:
            break  # a busy machine runs fewer sequences (the same seeds, in order), not a longer test
        _run_sequence(seed, tmp_path, stats)
        stats["sequences"] += 1
    print(f"{stats['sequences']} sequences x {EDITS} edits, {len(UNITS)} units: {stats}, "
          f"{time.monotonic() - started:.1f} s")
    # The sequences exercised both sides: most edits were served, the moving ones refused.
    assert stats["accepted"] >= stats["sequences"] * EDITS // 2
    assert stats["refused"] + stats["refused at restart"] >= stats["sequences"]


# -- the check itself, edit by edit ---------------------------------------------------------------

def _folder(tmp_path: Path, text: str) -> Path:
    folder = tmp_path / "flags"
    folder.mkdir(exist_ok=True)
    (folder / "f.yaml").write_text(text)
    return folder


PAIR = """
namespace: ns
---
flag: a
variants: {x: {v: 1}, y: {v: 2}}
rules:
  - name: exp
    experiment: {allocation: 20%, namespace: ns, arms: {x: 1, y: 1}}
---
flag: b
variants: {x: {v: 1}, y: {v: 2}}
rules:
  - name: exp
    experiment:
      allocation: 30%
      arms: {x: 1, y: 1}
---
flag: c
variants: {x: {v: 1}, y: {v: 2}}
rules:
  - name: exp
    experiment: {allocation: 50%, arms: {x: 1, y: 1}}
"""


def _validate(folder: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = twofold_main(["flags", "validate", str(folder)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("edit", "line", "says"), [
    # Declaring two overlapping running experiments exclusive would take units from one of them.
    (lambda t: t.replace("      arms: {x: 1, y: 1}\n", "      arms: {x: 1, y: 1}\n      exclusive_with: [c/exp]\n"),
     23, "which it is exclusive with"),
    # New weights switch units between arms.
    (lambda t: t.replace("allocation: 50%, arms: {x: 1, y: 1}", "allocation: 50%, arms: {x: 1, y: 3}"),
     22, "to another arm"),
    # Moving a running experiment into a namespace reshuffles its buckets.
    (lambda t: t.replace("allocation: 50%, arms", "allocation: 50%, namespace: ns, arms"), 22, "would lose"),
    # A rule ahead of a running experiment takes its units before its rule is reached.
    (lambda t: t.replace("flag: c\nvariants: {x: {v: 1}, y: {v: 2}}\nrules:\n",
                         "flag: c\nvariants: {x: {v: 1}, y: {v: 2}}\nrules:\n  - name: all-x\n    serve: x\n"),
     21, "ahead of running"),
])
def test_validate_refuses_changes_that_move_units_with_file_line_and_count(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: object, line: int, says: str) -> None:
    folder = _folder(tmp_path, PAIR)
    assert twofold_main(["flags", "lock", str(folder)]) == 0
    capsys.readouterr()
    assert _validate(folder, capsys)[0] == 0
    (folder / "f.yaml").write_text(edit(PAIR))  # type: ignore[operator]
    code, err = _validate(folder, capsys)
    assert code == 1, err
    assert f"{folder / 'f.yaml'}:{line}: refused" in err and says in err, err
    assert "allocation buckets (" in err and "% of all units)" in err
    # `lock` refuses it too and leaves the lock as it was, so the next validate still tells.
    assert twofold_main(["flags", "lock", str(folder)]) == 1
    assert _validate(folder, capsys)[0] == 1


def test_refusal_counts_the_units_it_would_move(tmp_path: Path) -> None:
    folder = _folder(tmp_path, PAIR)
    twofold_main(["flags", "lock", str(folder)])
    (folder / "f.yaml").write_text(PAIR.replace("allocation: 50%, arms: {x: 1, y: 1}",
                                                "allocation: 50%, arms: {x: 1, y: 3}"))
    with pytest.raises(FlagFileError) as err:
        compile_folder(folder)
    # x: [0, 5000) -> [0, 2500): a quarter of c's 500,000 buckets switch from x to y.
    assert "125,000 allocation buckets (12.5% of all units)" in str(err.value)


def test_validate_requires_an_up_to_date_lock(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _folder(tmp_path, PAIR)
    code, err = _validate(folder, capsys)
    assert code == 1 and "allocations.lock.json:1: is missing" in err
    assert twofold_main(["flags", "lock", str(folder)]) == 0
    capsys.readouterr()
    assert _validate(folder, capsys)[0] == 0
    (folder / "f.yaml").write_text(PAIR.replace("allocation: 20%", "allocation: 40%"))  # a safe ramp
    code, err = _validate(folder, capsys)
    assert code == 1 and "allocations.lock.json:1: is out of date" in err


def test_ramping_without_a_lock_leaves_the_exclusive_partner_alone(tmp_path: Path) -> None:
    """The issue's case: A 20% -> 40% beside exclusive partner B, nobody ran `lock`; the server compiles."""
    folder = _folder(tmp_path, PAIR.replace("      arms: {x: 1, y: 1}\n",
                                            "      arms: {x: 1, y: 1}\n      namespace: ns\n"))
    source = StateSource(folder, poll_interval=0)
    source.load_initial()
    before = _bits(source.current.state)
    (folder / "f.yaml").write_text((folder / "f.yaml").read_text().replace("allocation: 20%", "allocation: 40%"))
    failures = REGISTRY.get_sample_value("twofold_assignment_reload_failures_total")
    assert asyncio.run(source.reload_if_changed())
    assert REGISTRY.get_sample_value("twofold_assignment_reload_failures_total") == failures
    after = _bits(source.current.state)
    assert (before["segments/b--exp"] == after["segments/b--exp"]).all()
    assert (before["segments/a--exp"] & ~after["segments/a--exp"]).sum() == 0
    assert after["segments/a--exp"].sum() == 400_000 and not (after["segments/a--exp"] & after["segments/b--exp"]).any()


def _bits(state: ResolverState) -> dict[str, np.ndarray]:
    out = {}
    for name, seg in state.segments.items():
        if seg.bitset is not None:
            raw = np.frombuffer(seg.bitset.bits, dtype=np.uint8)
            out[name] = np.unpackbits(raw, bitorder="little")[:1_000_000].astype(bool)
    return out


# -- through a real server's hot reload and restart -------------------------------------------------

ISSUE_CASE = """
namespace: home
---
flag: a
variants: {x: {v: 1}, y: {v: 2}}
rules:
  - name: exp
    experiment: {allocation: 20%, namespace: home, arms: {x: 1, y: 1}}
---
flag: b
variants: {x: {v: 1}, y: {v: 2}}
rules:
  - name: exp
    experiment: {allocation: 30%, namespace: home, arms: {x: 1, y: 1}}
"""
SERVER_UNITS = [f"user-{i}" for i in range(1500)]


def _served(h: Harness) -> dict[str, dict[str, str]]:
    """flag -> unit -> variant (units outside the experiment left out), over gRPC."""
    out: dict[str, dict[str, str]] = {"flags/a": {}, "flags/b": {}}
    for unit in SERVER_UNITS:
        for f in h.resolve(unit, flags=("flags/a", "flags/b")).resolved_flags:
            if f.variant:
                out[f.flag][unit] = f.variant
    return out


def _wait_for(condition: object, what: str) -> None:
    deadline = time.time() + 15
    while not condition():  # type: ignore[operator]
        assert time.time() < deadline, what
        time.sleep(0.05)


def _assert_kept(before: dict[str, dict[str, str]], after: dict[str, dict[str, str]],
                 ramped_down: bool = False) -> None:
    for flag in before:
        if not ramped_down:
            assert before[flag].keys() <= after[flag].keys(), f"units left {flag}"
        assert all(after[flag][u] == v for u, v in before[flag].items() if u in after[flag]), f"{flag}: arms changed"
    assert not (after["flags/a"].keys() & after["flags/b"].keys()), "a unit is in both exclusive experiments"
    assert not (before["flags/a"].keys() & after["flags/b"].keys()), "a unit of a entered b"
    assert not (before["flags/b"].keys() & after["flags/a"].keys()), "a unit of b entered a"


def _replace_file(path: Path, text: str) -> None:
    """Swap a flag file in one step, as a ConfigMap update does: a reload never reads half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_server_hot_reload_and_restart_never_move_running_units(
        bg_loop: BackgroundLoop, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    flags = _folder(tmp_path, ISSUE_CASE)  # no allocations.lock.json: nobody ran `twofold flags lock`
    path = flags / "f.yaml"
    h = Harness(bg_loop, tmp_path, flags)
    try:
        first = _served(h)
        assert 200 < len(first["flags/a"]) < 400 and 350 < len(first["flags/b"]) < 550
        # The issue's case: ramping a from 20% to 40% without a lock moved 66% of b's units.
        generation = h.servicer.source.current.generation  # type: ignore[attr-defined]
        _replace_file(path, ISSUE_CASE.replace("allocation: 20%", "allocation: 40%"))
        _wait_for(lambda: h.servicer.source.current.generation != generation, "the ramp was not served")  # type: ignore[attr-defined]
        second = _served(h)
        assert len(second["flags/a"]) > 1.6 * len(first["flags/a"])
        _assert_kept(first, second)

        # New weights for b would switch units between its arms: refused, counted, logged; b keeps serving.
        failures = h.metric("twofold_assignment_reload_failures_total")
        generation = h.servicer.source.current.generation  # type: ignore[attr-defined]
        _replace_file(path, ISSUE_CASE.replace("allocation: 20%", "allocation: 40%")
                      .replace("allocation: 30%, namespace: home, arms: {x: 1, y: 1}",
                               "allocation: 30%, namespace: home, arms: {x: 1, y: 2}"))
        _wait_for(lambda: h.metric("twofold_assignment_reload_failures_total") != failures, "not refused")
        assert h.servicer.source.current.generation == generation  # type: ignore[attr-defined]
        refusals = [str(r.__dict__.get("fields", {}).get("problems")) for r in caplog.records
                    if "flag change refused" in r.getMessage()]
        assert any(f"{path}:14: refused" in p and "to another arm" in p and "% of all units" in p for p in refusals)
        assert _served(h) == second
    finally:
        h.close()

    # While the server is down, a ramp down of a and a ramp up of b, still without a lock; a
    # compile from scratch would reshuffle both. The restart compiles against its record instead.
    path.write_text(ISSUE_CASE.replace("allocation: 20%", "allocation: 10%").replace("allocation: 30%",
                                                                                      "allocation: 45%"))
    h = Harness(bg_loop, tmp_path, flags)
    try:
        third = _served(h)
        _assert_kept({"flags/a": second["flags/a"], "flags/b": {}}, {**third, "flags/b": {}}, ramped_down=True)
        _assert_kept({"flags/a": {}, "flags/b": second["flags/b"]}, third)
        assert not (set(first["flags/a"]) | set(second["flags/a"])) & set(third["flags/b"])
    finally:
        h.close()
