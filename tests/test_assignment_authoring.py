"""Flag files: errors with file and line, the conditions language, Confidence state as a source."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from assignment_server.authoring.compiler import DEFAULT_CLIENT_SECRET, compile_folder, load_flag_source
from assignment_server.authoring.errors import FlagFileError
from tests.spec_data import CONFORMANCE_DIR
from twofold.resolver import Reason, Resolver, ResolverState

ROOT = Path(__file__).resolve().parent.parent


def _folder(tmp_path: Path, text: str) -> Path:
    folder = tmp_path / "flags"
    folder.mkdir()
    (folder / "f.yaml").write_text(text)
    return folder


def _resolve(folder: Path, ctx: dict, flag: str = "flags/f") -> tuple[str, str]:
    r = Resolver(ResolverState.from_json(compile_folder(folder).state_json()))
    got = r.resolve([flag], ctx, DEFAULT_CLIENT_SECRET)[0]
    return got.variant_name, got.rule.rpartition("/")[2]


BAD = """flag: f
variants:
  a: {x: 1}
  b: {x: 2}
rules:
  - name: r1
    serve: c
  - name: r2
    when: {attribute: country, equals: SE}
    serve: a
  - name: r3
    experiment: {allocation: 150%, arms: {a: 1}}
"""


def test_validate_reports_each_error_with_file_and_line(tmp_path: Path) -> None:
    folder = _folder(tmp_path, BAD)
    with pytest.raises(FlagFileError) as err:
        compile_folder(folder)
    where = {(Path(p.file).name, p.line) for p in err.value.problems}
    assert {("f.yaml", 7), ("f.yaml", 9), ("f.yaml", 12)} <= where
    out = subprocess.run([sys.executable, "-m", "twofold", "flags", "validate", str(folder)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert f"{folder / 'f.yaml'}:7: unknown variant 'c'" in out.stderr
    assert "unknown or missing operator ['equals']" in out.stderr


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "flag: f\nvariants:\n  a: {x: 1\n")
    with pytest.raises(FlagFileError) as err:
        compile_folder(folder)
    assert err.value.problems[0].line >= 3 and "YAML syntax" in err.value.problems[0].message


def test_conditions_language(tmp_path: Path) -> None:
    folder = _folder(tmp_path, """
segment: adults
when: {attribute: age, gte: 18}
---
flag: f
variants: {a: {x: 1}, b: {x: 2}, c: {x: 3}, d: {x: 4}}
default: d
rules:
  - name: vip
    overrides: {c: [vip-1]}
  - name: nordic-adults-new-app
    when:
      all:
        - {segment: adults}
        - {attribute: country, in: [SE, NO]}
        - {attribute: app.version, gte: "2.1.0", type: semver}
        - not: {attribute: email, ends_with: "@test.com"}
    serve: a
  - name: launched
    when: {attribute: signup, gte: 2024-01-01T00:00:00Z}
    serve: b
""")
    base = {"targeting_key": "u1", "age": 30, "country": "SE", "app": {"version": "2.10.0"}, "email": "x@y.com"}
    assert _resolve(folder, base) == ("a", "nordic-adults-new-app")
    assert _resolve(folder, {**base, "app": {"version": "2.0.9"}}) == ("d", "default")
    assert _resolve(folder, {**base, "email": "x@test.com"}) == ("d", "default")
    assert _resolve(folder, {**base, "age": 17}) == ("d", "default")
    assert _resolve(folder, {**base, "targeting_key": "vip-1"}) == ("c", "vip--c")
    assert _resolve(folder, {"targeting_key": "u", "signup": "2024-03-01T10:00:00+02:00"}) == ("b", "launched")
    assert _resolve(folder, {"targeting_key": "u", "signup": 1700000000}) == ("d", "default")  # 2023


def test_client_environments_and_secrets_are_enforced(tmp_path: Path) -> None:
    folder = _folder(tmp_path, """
client: web
secrets:
  - {secret: web-production-secret, environments: [production]}
  - {secret: web-staging-secret-1, environments: [staging]}
---
flag: f
variants: {a: {x: 1}, b: {x: 2}}
rules:
  - name: prod-only
    environments: [production]
    serve: a
""")
    state = ResolverState.from_json(compile_folder(folder).state_json())
    r = Resolver(state)
    assert r.resolve(["flags/f"], {}, "web-production-secret")[0].variant_name == "a"
    staging = r.resolve(["flags/f"], {}, "web-staging-secret-1")[0]
    assert staging.reason == Reason.NO_SEGMENT_MATCH and staging.variant == ""
    assert DEFAULT_CLIENT_SECRET not in state.clients  # no development default once clients are defined


def test_confidence_state_file_is_a_flag_source() -> None:
    data, warnings = load_flag_source(CONFORMANCE_DIR / "state.json")
    state = ResolverState.from_json(data)
    assert "flags/simple-flag" in state.flags and warnings == []


def test_no_norway_problem(tmp_path: Path) -> None:
    """`NO`, `on` and `off` stay text: only true/false are booleans in flag files."""
    folder = _folder(tmp_path, """
flag: f
variants: {on: {x: 1}, off: {x: 2}}
default: off
rules:
  - name: norway
    when: {attribute: country, in: [NO, SE]}
    serve: on
""")
    assert _resolve(folder, {"targeting_key": "u", "country": "NO"}) == ("on", "norway")
    assert _resolve(folder, {"targeting_key": "u", "country": "DK"}) == ("off", "default")


def test_holdout_rule_once_per_flag_and_units_of_the_holdout_get_the_default(tmp_path: Path) -> None:
    folder = _folder(tmp_path, """
namespace: home
holdout: 20%
---
flag: f
variants: {a: {x: 1}, b: {x: 2}, c: {x: 3}}
default: c
rules:
  - name: first
    when: {attribute: platform, eq: web}
    experiment: {allocation: 30%, namespace: home, arms: {a: 1, b: 1}}
  - name: second
    experiment: {allocation: 30%, namespace: home, arms: {a: 1, b: 1}}
""")
    state = compile_folder(folder).state
    names = [r["name"].rpartition("/")[2] for r in state["flags"]["flags/f"]["rules"]]
    assert names == ["holdout--home", "first", "second", "default"]
    r = Resolver(ResolverState.from_dict(state))
    seen: dict[str, int] = {}
    for i in range(20_000):
        got = r.resolve("flags/f", {"targeting_key": f"u{i}", "platform": "web"}, DEFAULT_CLIENT_SECRET)[0]
        key = f"{got.rule.rpartition('/')[2]}:{got.variant_name}"
        seen[key] = seen.get(key, 0) + 1
    assert abs(seen["holdout--home:c"] / 20_000 - 0.20) < 0.015
    assert abs((seen["first:a"] + seen["first:b"]) / 20_000 - 0.30) < 0.015
    assert abs((seen["second:a"] + seen["second:b"]) / 20_000 - 0.30) < 0.015
    assert abs(seen["default:c"] / 20_000 - 0.20) < 0.015


OPERANDS = """flag: f
variants: {a: {x: 1}}
rules:
  - name: r
    when:
      all:
        - {attribute: app_version, gte: "abc", type: semver}
        - {attribute: app_version, lt: 2.10, type: semver}
        - {attribute: signup, gte: "yesterday", type: timestamp}
        - {attribute: age, gte: "eighteen", type: number}
        - {attribute: score, lt: .nan}
        - {attribute: age, gte: 65, lt: 18}
        - {attribute: app_version, gt: "2.0.0", lt: "2.0.0", type: semver}
        - {attribute: app_version, starts_with: "2.", type: semver}
        - {attribute: tier, in: [1, gold]}
        - {attribute: beta, gte: true}
        - {attribute: beta, eq: "yes", type: bool}
        - {attribute: country, eq: [SE, NO]}
        - {attribute: app_version, gte: "2.0.0", type: semver}
        - {attribute: signup, gte: 1700000000, type: timestamp}
        - {attribute: age, gte: "18", type: number, lt: 65}
    serve: a
"""


def test_every_operand_is_checked_against_its_type_with_file_and_line(tmp_path: Path) -> None:
    folder = _folder(tmp_path, OPERANDS)
    out = subprocess.run([sys.executable, "-m", "twofold", "flags", "validate", str(folder)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    file = folder / "f.yaml"
    expected = {
        7: "'abc' is not a quoted semantic version",
        8: "2.1 is not a quoted semantic version",
        9: "'yesterday' is not an ISO-8601 time",
        10: "'eighteen' is not a number",
        11: "nan is not a finite number",
        12: "the range is empty",
        13: "the range is empty",
        14: "`starts_with` compares text; it cannot apply to type semver",
        15: "`in` mixes numberValue and stringValue",
        16: "a range does not apply to true/false",
        17: "'yes' is not true or false",
        18: "is not a single value",
    }
    for line, message in expected.items():
        assert any(m.startswith(f"error: {file}:{line}: ") and message in m for m in out.stderr.splitlines()), \
            (line, message, out.stderr)
    assert not any(f"{file}:{line}:" in out.stderr for line in (19, 20, 21))  # valid operands pass

    # The valid ones compile to what the resolver compares.
    (folder / "f.yaml").write_text("\n".join(OPERANDS.splitlines()[:6] + OPERANDS.splitlines()[18:]) + "\n")
    criteria = compile_folder(folder).state["segments"]["segments/f--r"]["targeting"]["criteria"]
    assert criteria["c2"]["attribute"]["rangeRule"] == {"startInclusive": {"timestampValue": "2023-11-14T22:13:20Z"}}
    assert criteria["c3"]["attribute"]["rangeRule"] == {"startInclusive": {"numberValue": 18.0},
                                                        "endExclusive": {"numberValue": 65.0}}
    assert _resolve(folder, {"targeting_key": "u", "app_version": "2.3.1", "signup": "2024-01-01T00:00:00Z",
                             "age": 30}) == ("a", "r")
