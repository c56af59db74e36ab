"""Typed targeting values: how a context attribute is read as the type a rule compares against.

A rule's own value fixes the expected type (string, number, bool, timestamp, semantic version).
The context value is converted to it the way Confidence's resolvers do: numbers become strings
for string rules, ISO-8601 strings and epoch seconds/milliseconds become timestamps, "2.0.0"
becomes a version. Converted values are plain Python values of one kind per rule, so comparison
is ordinary `==`/`<` (numbers are floats, timestamps integer nanoseconds, versions 4-tuples).
A missing or null attribute is `NULL`; a value that cannot be converted is `INVALID`, which
equals nothing (not even `NULL`) and is in no range.
"""

from __future__ import annotations

import calendar
import re
from typing import Any, Final


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NULL: Final = _Sentinel("NULL")
INVALID: Final = _Sentinel("INVALID")

# Expected kinds
STRING, NUMBER, BOOL, TIMESTAMP, VERSION = "string", "number", "bool", "timestamp", "version"

_TS_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})"
    r"(?:[T ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|z|[+-]\d{2}:?\d{2})?)?$")
_NUMBER_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_timestamp(text: str) -> int | None:
    """Nanoseconds since the epoch for ISO-8601 / RFC 3339 text; naive times are UTC."""
    m = _TS_RE.match(text)
    if m is None:
        return None
    year, month, day = int(m[1]), int(m[2]), int(m[3])
    hour = int(m[4] or 0)
    minute = int(m[5] or 0)
    second = int(m[6] or 0)
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 61):
        return None
    try:
        seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
        if day > calendar.monthrange(year, month)[1]:
            return None
    except (ValueError, OverflowError):
        return None
    nanos = int((m[7] or "0").ljust(9, "0"))
    zone = m[8]
    if zone and zone not in ("Z", "z"):
        sign = 1 if zone[0] == "+" else -1
        digits = zone[1:].replace(":", "")
        seconds -= sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return seconds * 1_000_000_000 + nanos


def number_to_timestamp(value: float) -> int | None:
    """Epoch seconds, or epoch milliseconds when |value| >= 1e12, as nanoseconds."""
    if value != value or value in (float("inf"), float("-inf")):
        return None
    whole = int(value)
    if abs(whole) >= 1_000_000_000_000:
        return whole * 1_000_000
    return whole * 1_000_000_000


def parse_version(text: str) -> tuple[int, int, int, int] | None:
    """(major, minor, patch, tag) of "1.2", "1.2.3", "1.2.3.4"; a pre-release suffix is dropped.

    A three-part version whose third part has more than three digits is read as a tag
    ("1.0.1000" -> (1, 0, 0, 1000)), as Confidence's `SemanticVersion` does.
    """
    if not text:
        return None
    text = text.split("-", 1)[0]
    parts = text.split(".")
    if not 2 <= len(parts) <= 4 or any(not p.isascii() or not p.isdigit() or len(p) > 10 for p in parts):
        return None
    nums = [int(p) for p in parts]
    if len(nums) == 2:
        return (nums[0], nums[1], 0, 0)
    if len(nums) == 3:
        if len(parts[2]) > 3:
            return (nums[0], nums[1], 0, nums[2])
        return (nums[0], nums[1], nums[2], 0)
    return (nums[0], nums[1], nums[2], nums[3])


def format_number(value: float) -> str:
    """A number as text for string rules: integral values without a fraction ("42", not "42.0")."""
    if value == int(value) and abs(value) < 1e16:
        return str(int(value))
    return repr(float(value))


def rule_value(doc: Any) -> tuple[str | None, Any]:
    """(kind, converted value) of a rule value in proto-JSON form, e.g. {"stringValue": "SE"}."""
    if not isinstance(doc, dict) or not doc:
        return None, NULL
    if "stringValue" in doc:
        return STRING, str(doc["stringValue"])
    if "numberValue" in doc:
        return NUMBER, float(doc["numberValue"])
    if "boolValue" in doc:
        return BOOL, bool(doc["boolValue"])
    if "timestampValue" in doc:
        ts = doc["timestampValue"]
        parsed = parse_timestamp(ts) if isinstance(ts, str) else None
        return TIMESTAMP, INVALID if parsed is None else parsed
    if "versionValue" in doc:
        version = doc["versionValue"]
        text = version.get("version", "") if isinstance(version, dict) else str(version)
        return VERSION, parse_version(text) or (0, 0, 0, 0)
    return None, NULL


def convert(value: Any, kind: str | None) -> Any:
    """A scalar context value read as `kind`: a plain value, `NULL`, or `INVALID`."""
    if value is None:
        return NULL
    t = type(value)
    if t is str:
        if kind == STRING:
            return value
        if kind == NUMBER:
            if _NUMBER_RE.match(value):
                return float(value)
            return INVALID
        if kind == BOOL:
            if value == "true" or value == "TRUE":
                return True
            return False if value == "false" else value == "TRUE"
        if kind == TIMESTAMP:
            parsed = parse_timestamp(value)
            return INVALID if parsed is None else parsed
        if kind == VERSION:
            parsed_version = parse_version(value)
            return INVALID if parsed_version is None else parsed_version
        return INVALID
    if t is bool:
        return value if kind == BOOL else INVALID
    if t is int or t is float:
        if kind == NUMBER:
            return float(value)
        if kind == STRING:
            return format_number(float(value))
        if kind == TIMESTAMP:
            ts = number_to_timestamp(float(value))
            return INVALID if ts is None else ts
        return INVALID
    return INVALID
