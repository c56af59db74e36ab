"""Run a Confidence resolver-specification suite (`tests.json` against `state.json`).

Each case is a resolve request (flags, evaluation context, client secret, optional stored
materializations) and its expected result: the resolved flags with reason, variant, value and
`shouldApply`, or an expected error. Expectations under `general` are the specification;
implementation-specific overrides (e.g. `rust`) are ignored. Used by the test suite (one pytest
case per suite case) and by `twofold conformance confidence` for users migrating a state.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twofold.resolver import InMemoryMaterializations, ResolveError, Resolver, ResolverState


@dataclass(frozen=True)
class CaseResult:
    name: str
    passed: bool
    problems: tuple[str, ...] = ()


def load_cases(path: str | Path) -> list[dict[str, Any]]:
    cases = json.loads(Path(path).read_text())
    if isinstance(cases, dict):
        cases = cases.get("tests", [])
    if not isinstance(cases, list):
        raise ValueError(f"{path}: expected a JSON list of test cases")
    return cases


def run_case(state: ResolverState, case: dict[str, Any]) -> CaseResult:
    """Resolve one case and compare with its `general` expectation."""
    name = str(case.get("name", "?"))
    request = case.get("resolveRequest") or {}
    expected = (case.get("expectedResult") or {}).get("general") or {}
    store = InMemoryMaterializations.from_spec(case.get("materializations"))
    resolver = Resolver(state, store)
    try:
        flags = resolver.resolve(request.get("flags") or [], request.get("evaluationContext") or {},
                                 str(request.get("clientSecret", "")))
    except ResolveError as exc:
        if expected.get("expectError"):
            return CaseResult(name, True)
        return CaseResult(name, False, (f"unexpected error: {exc}",))
    if expected.get("expectError"):
        return CaseResult(name, False, (f"expected error {expected['expectError']!r}, got a result",))

    problems: list[str] = []
    want = expected.get("resolvedFlags") or []
    if len(flags) != len(want):
        problems.append(f"expected {len(want)} flags, got {len(flags)}: {[f.flag for f in flags]}")
    by_name = {f.flag: f for f in flags}
    for w in want:
        got = by_name.get(w["flag"])
        if got is None:
            problems.append(f"{w['flag']}: missing from the result")
            continue
        checks = [("reason", w.get("reason"), str(got.reason)), ("variant", w.get("variant", ""), got.variant)]
        want_value = w.get("value")
        got_value = dict(got.value) if got.value else None
        checks.append(("value", want_value or None, got_value))
        if "shouldApply" in w and w["shouldApply"] is not None:
            checks.append(("shouldApply", w["shouldApply"], got.should_apply))
        if w.get("assignmentOrigin") is not None:
            checks.append(("assignmentOrigin", w["assignmentOrigin"], got.rule))
        if w.get("assignmentId") is not None:
            checks.append(("assignmentId", w["assignmentId"], got.assignment_id))
        for label, a, b in checks:
            if a != b:
                problems.append(f"{w['flag']}: {label} expected {a!r}, got {b!r}")
    return CaseResult(name, not problems, tuple(problems))


def run_suite(state_path: str | Path, tests_path: str | Path) -> Iterator[CaseResult]:
    state = ResolverState.from_json(Path(state_path).read_bytes())
    for case in load_cases(tests_path):
        yield run_case(state, case)
