"""Segment targeting compiled into closures, once per state, so a resolve does no interpretation.

A segment's `targeting` holds named `criteria` and an `expression` over them (`ref`, `and`, `or`,
`not`). A criterion tests a context attribute (equality, set, range, prefix, suffix, substring,
any/all over a list), another segment, or membership in a materialized segment. Semantics follow
the Confidence resolver specification (see NOTICE.md of the conformance data):

- A list-valued attribute matches an equality/set/range rule when any element matches.
- `startsWith`, `endsWith` and `contains` only ever match strings (no number-to-text coercion).
- `anyRule`/`allRule` see a missing or null attribute as an empty list (so `all` holds).
- An equality rule with an empty value tests for null (a missing attribute is null).
- A range with neither bound matches nothing; an unknown rule kind makes its segment not match.
- Segment references are followed with cycle protection: a cycle evaluates to no match.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twofold.resolver.errors import UnrecognizedRuleError
from twofold.resolver.values import INVALID, NULL, STRING, convert, rule_value

# (context, unit, evaluation, visited segment names) -> matched
Predicate = Callable[[dict, "str | None", Any, tuple], bool]
_MISSING = object()


def _never(_ctx: dict, _unit: str | None, _ev: Any, _visited: tuple) -> bool:
    return False


def _always(_ctx: dict, _unit: str | None, _ev: Any, _visited: tuple) -> bool:
    return True


def _getter(path: str) -> Callable[[dict], Any]:
    """Read `a.b.c` from nested dicts; a missing step or a non-dict in between reads as None."""
    parts = path.split(".")
    if len(parts) == 1:
        key = parts[0]
        return lambda ctx: ctx.get(key)

    def get(ctx: dict) -> Any:
        value: Any = ctx
        for part in parts:
            if type(value) is not dict:
                return None
            value = value.get(part)
        return value
    return get


def _items(raw: Any, kind: str | None) -> list:
    """Converted values of an attribute for eq/set/range: a list's elements, else the value."""
    if type(raw) is list:
        return [INVALID if type(v) is list or type(v) is dict else convert(v, kind) for v in raw]
    return [convert(raw, kind)]


def _list_items(raw: Any, kind: str | None) -> list:
    """Elements for anyRule/allRule: a list's elements, a scalar alone, nothing for null."""
    if raw is None:
        return []
    if type(raw) is list:
        return [INVALID if type(v) is list or type(v) is dict else convert(v, kind) for v in raw]
    return [convert(raw, kind)]


def _string_items(raw: Any) -> list:
    """Elements for the strict string operators: strings only, anything else never matches."""
    if type(raw) is str:
        return [raw]
    if type(raw) is list:
        return [v if type(v) is str else INVALID for v in raw]
    return [INVALID]


# An item test: converted value -> bool, plus the kind it expects (None for strict strings).
ItemTest = tuple[Callable[[Any], bool], "str | None", bool]


def _item_test(rule: dict, where: str) -> ItemTest | None:
    """Compile one comparison (the part shared by attribute rules and any/all inner rules)."""
    if "eqRule" in rule:
        kind, expected = rule_value((rule["eqRule"] or {}).get("value"))
        if expected is INVALID:
            return (lambda v: False), kind, False
        if expected is NULL:
            return (lambda v: v is NULL), kind, False
        return (lambda v: v == expected and v is not INVALID), kind, False
    if "setRule" in rule:
        values = (rule["setRule"] or {}).get("values") or []
        kind = rule_value(values[0])[0] if values else None
        members = set()
        for doc in values:
            k, v = rule_value(doc)
            if k == kind and v is not INVALID:
                members.add(v)
        if not members:
            return (lambda v: False), kind, False
        return (lambda v: v in members), kind, False
    if "rangeRule" in rule:
        return _range_test(rule["rangeRule"] or {})
    for key, op in (("startsWithRule", str.startswith), ("endsWithRule", str.endswith),
                    ("containsRule", str.__contains__)):
        if key in rule:
            needle = (rule[key] or {}).get("value", "")
            if not isinstance(needle, str):
                raise UnrecognizedRuleError(f"{where}: {key} needs a string value")
            return (lambda v, op=op, needle=needle: type(v) is str and op(v, needle)), None, True
    return None


def _range_test(doc: dict) -> ItemTest:
    bounds = [(name, doc[name]) for name in ("startInclusive", "startExclusive", "endInclusive", "endExclusive")
              if name in doc and doc[name] is not None]
    if not bounds:
        return (lambda v: False), None, False
    kind = rule_value(bounds[0][1])[0]
    lo: Any = _MISSING
    hi: Any = _MISSING
    lo_incl = hi_incl = False
    for name, value_doc in bounds:
        k, v = rule_value(value_doc)
        if k != kind or v is INVALID or v is NULL:
            return (lambda v: False), kind, False
        if name.startswith("start") and lo is _MISSING:
            lo, lo_incl = v, name == "startInclusive"
        elif name.startswith("end") and hi is _MISSING:
            hi, hi_incl = v, name == "endInclusive"

    def test(v: Any) -> bool:
        if v is NULL or v is INVALID:
            return False
        if lo is not _MISSING and not (lo <= v if lo_incl else lo < v):
            return False
        return hi is _MISSING or (v <= hi if hi_incl else v < hi)
    return test, kind, False


def _quantified(get: Callable[[dict], Any], is_any: bool, inner: dict, where: str) -> Predicate:
    """anyRule / allRule: the inner rule tested on each element of a list attribute."""
    compiled = _item_test(inner, where)
    if compiled is None:
        return _unrecognized(f"{where} without a known inner rule")
    test, kind, strict = compiled
    quantifier = any if is_any else all

    def pred(ctx: dict, _u: Any, _e: Any, _v: tuple) -> bool:
        raw = get(ctx)
        items = _string_items(raw) if strict and raw is not None else _list_items(raw, kind)
        return quantifier(test(item) for item in items)
    return pred


def compile_attribute(doc: dict, where: str) -> Predicate:
    """An attribute criterion: `{"attributeName": ..., "<kind>Rule": {...}}`."""
    get = _getter(str(doc.get("attributeName", "")))
    for quantifier in ("anyRule", "allRule"):
        if quantifier in doc:
            return _quantified(get, quantifier == "anyRule", (doc[quantifier] or {}).get("rule") or {},
                               f"{where}: {quantifier}")

    compiled = _item_test(doc, where)
    if compiled is None:
        return _unrecognized(f"{where}: attribute criterion without a known rule")
    test, kind, strict = compiled
    if strict:
        def strict_pred(ctx: dict, _u: Any, _e: Any, _v: tuple) -> bool:
            raw = get(ctx)
            if type(raw) is str:
                return test(raw)
            return any(test(item) for item in _string_items(raw))
        return strict_pred
    if kind == STRING:
        # Fast path for the most common rule: a string attribute against a string value.
        def string_pred(ctx: dict, _u: Any, _e: Any, _v: tuple) -> bool:
            raw = get(ctx)
            if type(raw) is str:
                return test(raw)
            return any(test(item) for item in _items(raw, kind))
        return string_pred

    def pred(ctx: dict, _u: Any, _e: Any, _v: tuple) -> bool:
        return any(test(item) for item in _items(get(ctx), kind))
    return pred


def _unrecognized(message: str) -> Predicate:
    def raise_unrecognized(_c: dict, _u: Any, _e: Any, _v: tuple) -> bool:
        raise UnrecognizedRuleError(message)
    return raise_unrecognized


def compile_criterion(doc: Any, where: str) -> Predicate:
    """One criterion: attribute, segment reference or materialized segment; empty never matches."""
    if not isinstance(doc, dict) or not doc:
        return _never
    if "attribute" in doc:
        return compile_attribute(doc["attribute"] or {}, where)
    if "segment" in doc:
        ref = str((doc["segment"] or {}).get("segment", ""))

        def segment_pred(ctx: dict, unit: str | None, ev: Any, visited: tuple) -> bool:
            return ev.segment_match_by_name(ref, ctx, unit, visited)
        return segment_pred
    if "materializedSegment" in doc:
        name = str((doc["materializedSegment"] or {}).get("materializedSegment", ""))

        def materialized_pred(ctx: dict, unit: str | None, ev: Any, visited: tuple) -> bool:
            if unit is None:
                return False
            return ev.unit_in_materialized_segment(name, unit)
        return materialized_pred
    return _unrecognized(f"{where}: unknown criterion kind {sorted(doc)}")


def compile_expression(doc: Any, criteria: dict[str, Predicate]) -> Predicate:
    """`{"ref": id}`, `{"not": e}`, `{"and": {"operands": [...]}}`, `{"or": {...}}`; empty is false."""
    if not isinstance(doc, dict) or not doc:
        return _never
    if "ref" in doc:
        return criteria.get(str(doc["ref"]), _never)
    if "not" in doc:
        inner = compile_expression(doc["not"], criteria)
        return lambda c, u, e, v: not inner(c, u, e, v)
    for op in ("and", "or"):
        if op in doc:
            operands = [compile_expression(o, criteria) for o in (doc[op] or {}).get("operands") or []]
            if op == "and":
                if len(operands) == 2:
                    a, b = operands
                    return lambda c, u, e, v: a(c, u, e, v) and b(c, u, e, v)
                return lambda c, u, e, v: all(p(c, u, e, v) for p in operands)
            return lambda c, u, e, v: any(p(c, u, e, v) for p in operands)
    return _never


def compile_targeting(segment: dict) -> Predicate:
    """A segment's targeting as one predicate; a segment without targeting matches everyone."""
    targeting = segment.get("targeting")
    if not isinstance(targeting, dict):
        return _always
    name = str(segment.get("name", "?"))
    criteria = {str(cid): compile_criterion(c, f"{name} criterion {cid}")
                for cid, c in (targeting.get("criteria") or {}).items()}
    if "expression" not in targeting or targeting["expression"] is None:
        return _always
    return compile_expression(targeting["expression"], criteria)


def uses_segment_references(segment: dict) -> bool:
    """Whether evaluating the segment may recurse into other segments (needs cycle tracking)."""
    targeting = segment.get("targeting") or {}
    return any(isinstance(c, dict) and "segment" in c for c in (targeting.get("criteria") or {}).values())
