"""The `when:` language of flag files, compiled into Confidence targeting (criteria + expression).

    when: {attribute: country, in: [SE, NO]}
    when:
      all:
        - {attribute: age, gte: 18, lt: 65}
        - {attribute: app_version, gte: "2.0.0", type: semver}
        - {attribute: signup, gte: 2024-01-01T00:00:00Z}        # YAML timestamps are timestamps
        - any: [{attribute: email, ends_with: "@example.com"}, {segment: beta-testers}]
        - not: {attribute: tags, some: {eq: banned}}

Operators on an attribute: eq, ne, in, not_in, gt/gte/lt/lte (a range, two may combine),
starts_with, ends_with, contains, is_null (true/false), and `some`/`every` applying one of those
to each element of a list attribute. `type: semver|timestamp|number|string|bool` fixes how the
rule's values are typed (by default from the YAML value: text, number, boolean, timestamp).

Every operand is checked against its type with the resolver's own parsers, so a rule that could
never match (`gte: "abc", type: semver`, an empty range, a text operator on numbers) is an
error at its line instead of a segment that silently matches nobody.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from assignment_server.authoring.errors import Problem
from assignment_server.authoring.yamlio import Located
from twofold.resolver.values import INVALID, number_to_timestamp, parse_timestamp, parse_version, rule_value

COMPARISONS = {"eq", "ne", "in", "not_in", "gt", "gte", "lt", "lte", "starts_with", "ends_with", "contains",
               "is_null"}
TYPES = {"semver", "timestamp", "number", "string", "bool"}


class ConditionCompiler:
    """Builds one segment's criteria; `compile(cond)` returns the expression for `cond`."""

    def __init__(self, segment_names: set[str], problems: list[Problem], file: str) -> None:
        self.criteria: dict[str, dict] = {}
        self.segment_names = segment_names
        self.problems = problems
        self.file = file
        self.referenced_segments: list[str] = []

    def _error(self, node: Any, message: str, key: str | None = None) -> dict:
        line = node.line_of(key) if isinstance(node, Located) and key else getattr(node, "line", 0)
        self.problems.append(Problem(getattr(node, "file", self.file), line, message))
        return {}

    def _add(self, criterion: dict) -> dict:
        cid = f"c{len(self.criteria) + 1}"
        self.criteria[cid] = criterion
        return {"ref": cid}

    def compile(self, cond: Any) -> dict:
        if not isinstance(cond, dict) or not cond:
            return self._error(cond, "a condition must be a mapping such as {attribute: country, eq: SE}")
        if "all" in cond or "any" in cond:
            op = "all" if "all" in cond else "any"
            items = cond[op]
            if len(cond) != 1 or not isinstance(items, list) or not items:
                return self._error(cond, f"`{op}` takes a non-empty list of conditions and nothing else", op)
            return {"and" if op == "all" else "or": {"operands": [self.compile(c) for c in items]}}
        if "not" in cond:
            if len(cond) != 1:
                return self._error(cond, "`not` takes one condition and nothing else", "not")
            return {"not": self.compile(cond["not"])}
        if "segment" in cond:
            name = cond["segment"]
            if len(cond) != 1 or not isinstance(name, str):
                return self._error(cond, "`segment` takes the name of a segment", "segment")
            if name not in self.segment_names:
                return self._error(cond, f"unknown segment {name!r}", "segment")
            self.referenced_segments.append(name)
            return self._add({"segment": {"segment": f"segments/{name}"}})
        if "attribute" in cond:
            return self._attribute(cond)
        return self._error(cond, f"unknown condition {sorted(cond)}; use attribute, segment, all, any or not")

    def _attribute(self, cond: Located) -> dict:
        name = cond["attribute"]
        if not isinstance(name, str) or not name:
            return self._error(cond, "`attribute` must be a context attribute name", "attribute")
        kind = cond.get("type")
        if kind is not None and kind not in TYPES:
            return self._error(cond, f"unknown type {kind!r}; one of {sorted(TYPES)}", "type")
        ops = {k: v for k, v in cond.items() if k not in ("attribute", "type")}
        for quantifier in ("some", "every"):
            if quantifier in ops:
                inner = ops[quantifier]
                if len(ops) != 1 or not isinstance(inner, dict):
                    return self._error(cond, f"`{quantifier}` takes one comparison mapping, e.g. {{eq: premium}}",
                                       quantifier)
                rule, negate = self._comparison(inner, kind, cond)
                if negate:
                    return self._error(cond, f"`{quantifier}` cannot use ne/not_in/is_null", quantifier)
                key = "anyRule" if quantifier == "some" else "allRule"
                return self._add({"attribute": {"attributeName": name, key: {"rule": rule}}})
        rule, negate = self._comparison(ops, kind, cond)
        ref = self._add({"attribute": {"attributeName": name, **rule}})
        return {"not": ref} if negate else ref

    def _comparison(self, ops: dict, kind: str | None, node: Located) -> tuple[dict, bool]:
        unknown = sorted(set(ops) - COMPARISONS)
        if unknown or not ops:
            self._error(node, f"unknown or missing operator {unknown}; use one of {sorted(COMPARISONS)}")
            return {}, False
        ranges = {k: ops[k] for k in ("gt", "gte", "lt", "lte") if k in ops}
        others = {k: v for k, v in ops.items() if k not in ranges}
        if (ranges and others) or len(others) > 1:
            self._error(node, f"combine only range operators (gt/gte/lt/lte); got {sorted(ops)}")
            return {}, False
        if ranges:
            if ("gt" in ranges and "gte" in ranges) or ("lt" in ranges and "lte" in ranges):
                self._error(node, "a range has at most one lower and one upper bound")
                return {}, False
            if kind == "bool" or any(isinstance(v, bool) for v in ranges.values()):
                self._error(node, "a range does not apply to true/false", next(iter(ranges)))
                return {}, False
            rule: dict = {}
            for op, proto in (("gte", "startInclusive"), ("gt", "startExclusive"),
                              ("lte", "endInclusive"), ("lt", "endExclusive")):
                if op in ranges:
                    rule[proto] = self._value(ranges[op], kind, node, op)
            self._check_range(rule, node, next(iter(ranges)))
            return {"rangeRule": rule}, False
        op, value = next(iter(others.items()))
        if op in ("eq", "ne"):
            return {"eqRule": {"value": self._value(value, kind, node, op)}}, op == "ne"
        if op in ("in", "not_in"):
            if not isinstance(value, list) or not value:
                self._error(node, f"`{op}` takes a non-empty list", op)
                return {}, False
            values = [self._value(v, kind, node, op) for v in value]
            kinds = {next(iter(v)) for v in values if v}
            if len(kinds) > 1:
                self._error(node, f"`{op}` mixes {' and '.join(sorted(kinds))}: a unit's value is compared as one "
                                  "type, so some entries could never match; give `type:` or make them alike", op)
            return {"setRule": {"values": values}}, op == "not_in"
        if op == "is_null":
            if not isinstance(value, bool):
                self._error(node, "`is_null` takes true or false", op)
                return {}, False
            return {"eqRule": {"value": {}}}, not value
        if not isinstance(value, str):
            self._error(node, f"`{op}` takes text", op)
            return {}, False
        if kind not in (None, "string"):
            self._error(node, f"`{op}` compares text; it cannot apply to type {kind}", op)
            return {}, False
        key = {"starts_with": "startsWithRule", "ends_with": "endsWithRule", "contains": "containsRule"}[op]
        return {key: {"value": value}}, False

    def _check_range(self, rule: dict, node: Located, key: str) -> None:
        """A range whose lower bound is above its upper bound matches nobody: an error, not a silent rule."""
        lower = rule.get("startInclusive") or rule.get("startExclusive")
        upper = rule.get("endInclusive") or rule.get("endExclusive")
        if not lower or not upper:
            return
        (lo_kind, lo), (hi_kind, hi) = rule_value(lower), rule_value(upper)
        if lo_kind != hi_kind:
            self._error(node, f"the range's bounds are of different types ({lo_kind}, {hi_kind})", key)
        elif lo is not INVALID and hi is not INVALID and (
                lo > hi or (lo == hi and ("startExclusive" in rule or "endExclusive" in rule))):
            self._error(node, "the range is empty (its lower bound is not below its upper bound): it never matches",
                        key)

    def _value(self, value: Any, kind: str | None, node: Located, op: str) -> dict:
        """The proto-JSON value of one operand, checked against its (declared or YAML) type."""
        def bad(expected: str) -> dict:
            self._error(node, f"`{op}`: {value!r} is not {expected}", op)
            return {}

        if isinstance(value, list | dict) or value is None:
            return bad("a single value (text, number, true/false or a time)")
        if kind == "semver":
            if not isinstance(value, str) or parse_version(value) is None:  # unquoted 2.10 would be the float 2.1
                return bad('a quoted semantic version such as "2.1.0" (`type: semver`)')
            return {"versionValue": {"version": str(value)}}
        if kind == "timestamp" or isinstance(value, dt.datetime | dt.date):
            if isinstance(value, dt.datetime):
                ts = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
                return {"timestampValue": ts.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")}
            if isinstance(value, dt.date):
                return {"timestampValue": f"{value.isoformat()}T00:00:00Z"}
            if isinstance(value, int | float) and not isinstance(value, bool):
                nanos = number_to_timestamp(float(value))  # epoch seconds or milliseconds, as in contexts
                if nanos is None:
                    return bad("a time")
                return {"timestampValue": dt.datetime.fromtimestamp(nanos // 1_000_000_000, dt.UTC)
                        .isoformat().replace("+00:00", "Z")}
            if not isinstance(value, str) or parse_timestamp(value) is None:
                return bad('an ISO-8601 time such as "2024-01-31T00:00:00Z" (`type: timestamp`)')
            return {"timestampValue": value}
        if kind == "string" or (kind is None and isinstance(value, str)):
            return {"stringValue": str(value)}
        if kind == "bool" or (kind is None and isinstance(value, bool)):
            if not isinstance(value, bool):
                return bad("true or false (`type: bool`)")
            return {"boolValue": value}
        if kind == "number" and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return bad("a number (`type: number`)")
        if isinstance(value, int | float) and not isinstance(value, bool):
            if value != value or value in (float("inf"), float("-inf")):
                return bad("a finite number")
            return {"numberValue": float(value)}
        return bad(f"a {kind or 'supported value'}")
