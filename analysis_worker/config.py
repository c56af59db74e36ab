"""Experiment definitions in YAML: which flag, which arms, when, and what to measure.

A definition is validated completely when it is loaded, and every problem is reported with the
field it concerns (`ConfigError`), so a typo never surfaces later as a SQL or numpy error. See
`examples/experiments/home-ranking.yaml` and docs/analysis.md for the full format.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from analysis_worker.inputs import (
    CORRECTIONS,
    DIRECTIONS,
    MEAN_TESTS,
    ROLES,
    SEQUENTIAL_METHODS,
    InputError,
    check_error_budget,
)
from twofold.yaml_errors import yaml_error_line

AGGREGATES = ("sum", "count")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")


class ConfigError(ValueError):
    """The experiment definition is invalid; the message names the field."""


def parse_duration(value: Any, where: str) -> int:
    """'7d', '12h', '30m', '90s', '2w' or a number of seconds -> seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return int(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            seconds = int(float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
            if seconds > 0:
                return seconds
    raise ConfigError(f"{where}: expected a positive duration such as 7d, 12h or 30m; got {value!r}")


def parse_time(value: Any, where: str) -> dt.datetime:
    """A date (midnight UTC) or an ISO timestamp (UTC when no offset is given)."""
    if isinstance(value, dt.datetime):
        parsed = value
    elif isinstance(value, dt.date):
        parsed = dt.datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError as exc:
            raise ConfigError(f"{where}: expected a date or ISO timestamp, got {value!r}") from exc
    else:
        raise ConfigError(f"{where}: expected a date or ISO timestamp, got {value!r}")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.astimezone(dt.UTC)


@dataclass(frozen=True)
class EventMeasure:
    """Which events make a per-unit value, and how they are aggregated (sum of values or count)."""

    events: tuple[str, ...]
    aggregate: str = "count"


@dataclass(frozen=True)
class Cap:
    """Winsorization: per-unit values above `value`, or above the `percentile` of all units, are capped."""

    value: float | None = None
    percentile: float | None = None


@dataclass(frozen=True)
class MetricConfig:
    """One metric of an experiment."""

    name: str
    kind: str  # binary | mean | ratio
    role: str
    direction: str
    window_seconds: int
    measure: EventMeasure  # the value (numerator for ratios)
    denominator: EventMeasure | None = None
    nim: float = 0.0
    cap: Cap | None = None
    cuped_window_seconds: int | None = None
    test: str = "welch-t"
    mde: float | None = None

    @property
    def event_names(self) -> tuple[str, ...]:
        names = list(self.measure.events)
        if self.denominator is not None:
            names += self.denominator.events
        return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class SequentialConfig:
    method: str
    expected_units: int
    rho: float = 2.0


@dataclass(frozen=True)
class ExperimentConfig:
    """A validated experiment definition."""

    name: str
    flag: str
    control: str
    split: dict[str, float]
    start: dt.datetime
    metrics: list[MetricConfig]
    end: dt.datetime | None = None
    rule: str | None = None
    alpha: float = 0.05
    power: float = 0.8
    correction: str = "risk-aware"
    sequential: SequentialConfig | None = None
    description: str = ""
    # risk-aware: the deterioration tests' own error budget (None: alpha).
    deterioration_alpha: float | None = None
    source: str = ""

    def flag_names(self) -> tuple[str, str]:
        """Both spellings of the flag in the exposures table: the assignment server writes the
        Confidence resource name `flags/<flag>`; other tools may write the bare name."""
        return (self.flag, f"flags/{self.flag}")

    def rule_names(self) -> tuple[str, ...]:
        """Both spellings of the rule: `flags/<flag>/rules/<rule>` (Confidence) or the bare name."""
        if not self.rule:
            return ()
        if self.rule.startswith("flags/"):
            return (self.rule,)
        return (self.rule, f"flags/{self.flag}/rules/{self.rule}")

    def exposure_names(self) -> dict[str, str]:
        """Every spelling of each variant in the exposures table -> the short name.

        Exposures carry the full Confidence name `flags/<flag>/variants/<variant>`; the short
        name is accepted too, so lakes written by other tools read the same.
        """
        names: dict[str, str] = {}
        for short in self.split:
            names[short] = short
            names[f"flags/{self.flag}/variants/{short}"] = short
        return names


def _short_variant(name: str, flag: str, where: str) -> str:
    prefix = f"flags/{flag}/variants/"
    if name.startswith("flags/"):
        if not name.startswith(prefix):
            raise ConfigError(f"{where}: variant {name!r} does not belong to flag {flag!r}")
        name = name[len(prefix):]
    if not _NAME.match(name):
        raise ConfigError(f"{where}: invalid variant name {name!r}")
    return name


def _events(raw: Any, where: str) -> tuple[str, ...]:
    names = [raw] if isinstance(raw, str) else raw
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{where}: an event name or a non-empty list of event names is required")
    return tuple(dict.fromkeys(names))


def _measure(raw: Any, where: str, default_aggregate: str) -> EventMeasure:
    if isinstance(raw, str | list):
        return EventMeasure(events=_events(raw, where), aggregate=default_aggregate)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected an event name or {{event: ..., aggregate: sum|count}}")
    aggregate = raw.get("aggregate", default_aggregate)
    if aggregate not in AGGREGATES:
        raise ConfigError(f"{where}.aggregate: must be sum or count, got {aggregate!r}")
    return EventMeasure(events=_events(raw.get("event", raw.get("events")), f"{where}.event"), aggregate=aggregate)


def _number(raw: Mapping[str, Any], key: str, where: str, default: float | None, lo: float, hi: float) -> float | None:
    value = raw.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= float(value) <= hi:
        raise ConfigError(f"{where}.{key}: expected a number within [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def _metric(raw: Any, index: int) -> MetricConfig:
    where = f"metrics[{index}]"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}.name: required; letters, digits and _.:- only")
    where = f"metric {name!r}"
    known = {"name", "kind", "event", "events", "aggregate", "numerator", "denominator", "window", "role",
             "direction", "nim", "cap", "cuped", "test", "mde", "description"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")
    kind = raw.get("kind", "mean")
    if kind not in ("binary", "mean", "ratio"):
        raise ConfigError(f"{where}.kind: must be binary, mean or ratio; got {kind!r}")
    role = raw.get("role", "success")
    if role not in ROLES:
        raise ConfigError(f"{where}.role: must be success or guardrail; got {role!r}")
    direction = raw.get("direction", "increase")
    if direction not in DIRECTIONS:
        raise ConfigError(f"{where}.direction: must be increase or decrease; got {direction!r}")
    window = parse_duration(raw.get("window", "7d"), f"{where}.window")
    denominator = None
    if kind == "ratio":
        if "numerator" not in raw or "denominator" not in raw:
            raise ConfigError(f"{where}: a ratio metric needs numerator and denominator")
        measure = _measure(raw["numerator"], f"{where}.numerator", "count")
        denominator = _measure(raw["denominator"], f"{where}.denominator", "count")
    else:
        if "event" not in raw and "events" not in raw:
            raise ConfigError(f"{where}.event: required (the event name or names this metric counts)")
        default = "count" if kind == "binary" else "sum"
        measure = EventMeasure(events=_events(raw.get("event", raw.get("events")), f"{where}.event"),
                               aggregate=raw.get("aggregate", default))
        if measure.aggregate not in AGGREGATES:
            raise ConfigError(f"{where}.aggregate: must be sum or count, got {measure.aggregate!r}")
    nim = _number(raw, "nim", where, 0.0, 0.0, 10.0) or 0.0
    if raw.get("nim") is not None and role != "guardrail":
        raise ConfigError(f"{where}.nim: a non-inferiority margin only applies to guardrails")
    cap = None
    if raw.get("cap") is not None:
        cap_raw = raw["cap"]
        if isinstance(cap_raw, int | float) and not isinstance(cap_raw, bool):
            cap_raw = {"value": cap_raw}
        if not isinstance(cap_raw, Mapping) or len(cap_raw) != 1 or not set(cap_raw) <= {"value", "percentile"}:
            raise ConfigError(f"{where}.cap: expected {{value: X}} or {{percentile: 0.99}}")
        if kind == "binary":
            raise ConfigError(f"{where}.cap: a binary metric cannot be capped")
        cap = Cap(value=_number(cap_raw, "value", f"{where}.cap", None, -1e300, 1e300),
                  percentile=_number(cap_raw, "percentile", f"{where}.cap", None, 0.5, 1.0))
    cuped_window = None
    if raw.get("cuped") not in (None, False):
        if kind == "ratio":
            raise ConfigError(f"{where}.cuped: CUPED is supported for binary and mean metrics, not ratios")
        cuped_raw = raw["cuped"]
        if cuped_raw is True:
            cuped_window = window
        elif isinstance(cuped_raw, Mapping):
            cuped_window = parse_duration(cuped_raw.get("window", raw.get("window", "7d")), f"{where}.cuped.window")
        else:
            cuped_window = parse_duration(cuped_raw, f"{where}.cuped")
    test = raw.get("test", "welch-t" if kind == "mean" else "z")
    if test not in MEAN_TESTS or (kind != "mean" and test != "z"):
        raise ConfigError(f"{where}.test: welch-t or z for mean metrics, z for binary and ratio metrics")
    mde = _number(raw, "mde", where, None, 1e-9, 100.0)
    return MetricConfig(name=name, kind=kind, role=role, direction=direction, window_seconds=window, measure=measure,
                        denominator=denominator, nim=nim, cap=cap, cuped_window_seconds=cuped_window, test=test,
                        mde=mde)


def _split(raw: Any, flag: str) -> dict[str, float]:
    if isinstance(raw, Mapping):
        items = [(str(k), v) for k, v in raw.items()]
    elif isinstance(raw, list):
        items = []
        for i, entry in enumerate(raw):
            if isinstance(entry, str):
                items.append((entry, None))
            elif isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
                items.append((entry["name"], entry.get("weight")))
            else:
                raise ConfigError(f"variants[{i}]: expected a name or {{name: ..., weight: ...}}")
    else:
        raise ConfigError("variants: a list of variant names, or a mapping of name -> expected share")
    if len(items) < 2:
        raise ConfigError("variants: at least two (the control and one treatment)")
    shares: dict[str, float] = {}
    for name, weight in items:
        short = _short_variant(name, flag, "variants")
        if short in shares:
            raise ConfigError(f"variants: {short!r} listed twice")
        if weight is None:
            weight = 1.0
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0:
            raise ConfigError(f"variants: the weight of {short!r} must be a positive number")
        shares[short] = float(weight)
    total = sum(shares.values())
    return {k: v / total for k, v in shares.items()}


def parse_experiment(raw: Any, source: str = "") -> ExperimentConfig:
    """Validate an experiment definition (a decoded YAML mapping)."""
    if not isinstance(raw, Mapping):
        raise ConfigError("an experiment definition must be a mapping")
    known = {"name", "flag", "rule", "control", "variants", "start", "end", "alpha", "power", "correction",
             "deterioration_alpha", "sequential", "metrics", "description"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(unknown)}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError("name: required; letters, digits and _.:- only")
    flag = raw.get("flag")
    if isinstance(flag, str) and flag.startswith("flags/"):
        flag = flag[len("flags/"):]
    if not isinstance(flag, str) or not _NAME.match(flag):
        raise ConfigError("flag: required, the flag's name (e.g. home-ranking or flags/home-ranking)")
    rule = raw.get("rule")
    if rule is not None and (not isinstance(rule, str) or not rule):
        raise ConfigError("rule: a rule name, or leave it out to take every rule of the flag")
    split = _split(raw.get("variants"), flag)
    control = _short_variant(str(raw.get("control", next(iter(split)))), flag, "control")
    if control not in split:
        raise ConfigError(f"control: {control!r} is not one of the variants ({', '.join(split)})")
    if "start" not in raw:
        raise ConfigError("start: required (a date or ISO timestamp, UTC)")
    start = parse_time(raw["start"], "start")
    end = parse_time(raw["end"], "end") if raw.get("end") is not None else None
    if end is not None and end <= start:
        raise ConfigError("end: must be after start")
    alpha = _number(raw, "alpha", "experiment", 0.05, 1e-6, 0.5) or 0.05
    power = _number(raw, "power", "experiment", 0.8, 0.01, 0.9999) or 0.8
    correction = raw.get("correction", "risk-aware")
    if correction not in CORRECTIONS:
        raise ConfigError(f"correction: one of {', '.join(CORRECTIONS)}; got {correction!r}")
    deterioration_alpha = _number(raw, "deterioration_alpha", "experiment", None, 1e-6, 0.5)
    try:
        check_error_budget(alpha, power, deterioration_alpha)
    except InputError as exc:
        raise ConfigError(str(exc)) from None
    sequential = None
    if raw.get("sequential") is not None:
        seq = raw["sequential"]
        if not isinstance(seq, Mapping):
            raise ConfigError("sequential: expected {method: group-sequential|always-valid, expected_units: N}")
        method = seq.get("method")
        if method not in SEQUENTIAL_METHODS:
            raise ConfigError(f"sequential.method: one of {', '.join(SEQUENTIAL_METHODS)}; got {method!r}")
        expected = seq.get("expected_units")
        if isinstance(expected, bool) or not isinstance(expected, int) or expected < 2:
            raise ConfigError("sequential.expected_units: the total number of units the experiment plans for")
        rho = _number(seq, "rho", "sequential", 2.0, 0.1, 10.0) or 2.0
        if correction == "holm":
            raise ConfigError("correction: holm has no sequential version; use bonferroni or risk-aware")
        sequential = SequentialConfig(method=method, expected_units=expected, rho=rho)
    metrics_raw = raw.get("metrics")
    if not isinstance(metrics_raw, list) or not metrics_raw:
        raise ConfigError("metrics: a non-empty list is required")
    metrics = [_metric(m, i) for i, m in enumerate(metrics_raw)]
    names = [m.name for m in metrics]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ConfigError(f"metrics: duplicate names {', '.join(duplicated)}")
    return ExperimentConfig(name=name, flag=flag, control=control, split=split, start=start, end=end, rule=rule,
                            alpha=alpha, power=power, correction=correction, sequential=sequential,
                            deterioration_alpha=deterioration_alpha,
                            metrics=metrics, description=str(raw.get("description", "")), source=source)


def load_experiment(source: str | Path | Mapping[str, Any]) -> ExperimentConfig:
    """An experiment from a YAML file path or an already-decoded mapping."""
    if isinstance(source, Mapping):
        return parse_experiment(source)
    path = Path(source)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_error_line(path, exc)) from exc
    try:
        return parse_experiment(raw, source=str(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def load_experiments(paths: list[str | Path]) -> tuple[list[ExperimentConfig], list[str]]:
    """Every experiment under `paths` (files or folders of *.yaml / *.yml); errors are collected, not raised."""
    files: list[Path] = []
    for entry in paths:
        p = Path(entry)
        if p.is_dir():
            files += sorted([*p.glob("*.yaml"), *p.glob("*.yml")])
        else:
            files.append(p)
    experiments: list[ExperimentConfig] = []
    errors: list[str] = []
    seen: set[str] = set()
    for file in files:
        try:
            exp = load_experiment(file)
        except ConfigError as exc:
            errors.append(str(exc))
            continue
        if exp.name in seen:
            errors.append(f"{file}: experiment name {exp.name!r} is already used by another file")
            continue
        seen.add(exp.name)
        experiments.append(exp)
    return experiments, errors
