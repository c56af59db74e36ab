"""The sufficient-statistics input (`twofold stats FILE.json`, ComputeFromStatistics), validated up front.

Everything the statistics engine needs arrives in one `StatsInput`: the lake path builds it from
its SQL query, teams with their own warehouse write it as JSON. Validation happens here, once, and
raises `InputError` with a message that names the offending field, so neither the CLI nor the gRPC
service ever shows a traceback for bad input.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from analysis_worker.hypotheses import SRM_THRESHOLD

KINDS = ("mean", "binary", "ratio")
ROLES = ("success", "guardrail")
DIRECTIONS = ("increase", "decrease")
CORRECTIONS = ("bonferroni", "holm", "risk-aware", "none")
SEQUENTIAL_METHODS = ("group-sequential", "always-valid")
MEAN_TESTS = ("welch-t", "z")

BASE_FIELDS = ("n", "sum", "sum_sq")
RATIO_FIELDS = ("den_sum", "den_sum_sq", "prod_sum")
CUPED_FIELDS = ("cov_sum", "cov_sum_sq", "cov_prod_sum")


class InputError(ValueError):
    """The input cannot be analysed; the message says which field and why."""


@dataclass(frozen=True)
class VariantStats:
    """Sufficient statistics of one metric in one variant (sums over units)."""

    n: float
    sum: float
    sum_sq: float
    den_sum: float = 0.0
    den_sum_sq: float = 0.0
    prod_sum: float = 0.0
    cov_sum: float = 0.0
    cov_sum_sq: float = 0.0
    cov_prod_sum: float = 0.0


@dataclass(frozen=True)
class MetricInput:
    """One metric: how to test it and its statistics per variant."""

    name: str
    kind: str
    role: str
    direction: str
    nim: float
    variants: dict[str, VariantStats]
    cuped: bool = False
    test: str = "welch-t"
    # Relative minimum detectable effect the experiment is powered for (sample-size planning).
    mde: float | None = None
    # Cumulative statistics per look (oldest first), for the cumulative-effect chart; optional.
    history: list[dict[str, VariantStats]] = field(default_factory=list)


@dataclass(frozen=True)
class SequentialInput:
    """Sequential-testing settings: method, expected total units and units at each look so far."""

    method: str
    expected_n: float
    looks: list[float]
    rho: float = 2.0


@dataclass(frozen=True)
class StatsInput:
    """A whole analysis request."""

    alpha: float
    power: float
    correction: str
    control: str
    expected_split: dict[str, float]
    metrics: list[MetricInput]
    sequential: SequentialInput | None = None
    experiment: str = ""
    # Units per variant for the SRM check; defaults to the largest n seen per variant.
    units: dict[str, float] | None = None
    # risk-aware: the error budget of the deterioration (inferiority) tests, per treatment and
    # Bonferroni-split over its metrics; None means the same as `alpha`.
    deterioration_alpha: float | None = None

    @property
    def deterioration_level(self) -> float:
        return self.alpha if self.deterioration_alpha is None else self.deterioration_alpha


def _number(value: Any, where: str, *, minimum: float | None = None, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"{where}: expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise InputError(f"{where}: must be finite, got {value!r}")
    if minimum is not None and number < minimum:
        raise InputError(f"{where}: must be >= {minimum:g}, got {value!r}")
    if integer and number != int(number):
        raise InputError(f"{where}: must be a whole number, got {value!r}")
    return number


def _choice(value: Any, options: tuple[str, ...], where: str) -> str:
    if value not in options:
        raise InputError(f"{where}: must be one of {', '.join(options)}; got {value!r}")
    return str(value)


def _variant_stats(raw: Any, where: str, kind: str, cuped: bool) -> VariantStats:
    if not isinstance(raw, Mapping):
        raise InputError(f"{where}: expected an object of sufficient statistics")
    needed = list(BASE_FIELDS)
    if kind == "binary" and "sum_sq" not in raw:
        # For 0/1 values sum_sq equals sum: a binary metric needs no sum of squares.
        raw = {**raw, "sum_sq": raw.get("sum")}
    if kind == "ratio":
        needed += RATIO_FIELDS
    if cuped:
        needed += CUPED_FIELDS
    missing = [name for name in needed if name not in raw]
    if missing:
        raise InputError(f"{where}: missing {', '.join(missing)}")
    values = {name: _number(raw[name], f"{where}.{name}") for name in needed}
    values["n"] = _number(raw["n"], f"{where}.n", minimum=0, integer=True)
    for name in ("sum_sq", "den_sum_sq", "cov_sum_sq"):
        if name in values and values[name] < 0:
            raise InputError(f"{where}.{name}: a sum of squares cannot be negative")
    stats = VariantStats(**values)
    if kind == "binary" and stats.n > 0 and not 0 <= stats.sum <= stats.n:
        raise InputError(f"{where}: a binary metric needs 0 <= sum <= n, got sum={stats.sum:g}, n={stats.n:g}")
    if stats.n > 0 and stats.sum_sq * stats.n < stats.sum**2 * (1 - 1e-9) - 1e-9:
        raise InputError(f"{where}: sum_sq is smaller than sum^2 / n, which no data can produce")
    return stats


def parse_metric(raw: Any, index: int, variant_names: list[str] | None = None) -> MetricInput:
    """Validate one metric object of the input document."""
    where = f"metrics[{index}]"
    if not isinstance(raw, Mapping):
        raise InputError(f"{where}: expected an object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InputError(f"{where}.name: required, a non-empty string")
    where = f"metric {name!r}"
    kind = _choice(raw.get("kind", "mean"), KINDS, f"{where}.kind")
    role = _choice(raw.get("role", "success"), ROLES, f"{where}.role")
    direction = _choice(raw.get("direction", "increase"), DIRECTIONS, f"{where}.direction")
    nim_raw = raw.get("nim")
    nim = 0.0 if nim_raw is None else _number(nim_raw, f"{where}.nim", minimum=0)
    cuped = bool(raw.get("cuped", False)) or any(
        isinstance(v, Mapping) and "cov_sum" in v for v in (raw.get("variants") or {}).values())
    if cuped and kind == "ratio":
        raise InputError(f"{where}: CUPED is supported for mean and binary metrics, not ratio metrics")
    test = _choice(raw.get("test", "welch-t" if kind == "mean" else "z"), MEAN_TESTS, f"{where}.test")
    if kind != "mean" and test != "z":
        raise InputError(f"{where}.test: {kind} metrics use the z test")
    mde_raw = raw.get("mde")
    mde = None if mde_raw is None else _number(mde_raw, f"{where}.mde")
    if mde is not None and mde <= 0:
        raise InputError(f"{where}.mde: the relative minimum detectable effect must be positive")
    variants_raw = raw.get("variants")
    if not isinstance(variants_raw, Mapping) or len(variants_raw) < 2:
        raise InputError(f"{where}.variants: needs statistics for the control and at least one treatment")
    variants = {str(v): _variant_stats(s, f"{where}.variants[{v!r}]", kind, cuped) for v, s in variants_raw.items()}
    if variant_names is not None:
        unknown = sorted(set(variants) - set(variant_names))
        if unknown:
            raise InputError(f"{where}.variants: {', '.join(unknown)} not in expected_split")
    history: list[dict[str, VariantStats]] = []
    for i, look in enumerate(raw.get("history") or []):
        if not isinstance(look, Mapping):
            raise InputError(f"{where}.history[{i}]: expected an object of variants")
        history.append({str(v): _variant_stats(s, f"{where}.history[{i}][{v!r}]", kind, cuped)
                        for v, s in look.items()})
    return MetricInput(name=name, kind=kind, role=role, direction=direction, nim=nim, variants=variants,
                       cuped=cuped, test=test, mde=mde, history=history)


def parse_sequential(raw: Any) -> SequentialInput | None:
    """Validate the `sequential` object (null means a fixed-horizon analysis)."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise InputError("sequential: expected null or an object")
    method = _choice(raw.get("method"), SEQUENTIAL_METHODS, "sequential.method")
    expected_n = _number(raw.get("expected_n"), "sequential.expected_n", minimum=1)
    looks_raw = raw.get("looks") or []
    if not isinstance(looks_raw, list):
        raise InputError("sequential.looks: expected a list of cumulative unit counts, one per look")
    looks = [_number(v, f"sequential.looks[{i}]", minimum=1) for i, v in enumerate(looks_raw)]
    if any(b < a for a, b in itertools.pairwise(looks)):
        raise InputError("sequential.looks: cumulative unit counts must not decrease")
    rho = _number(raw.get("rho", 2.0), "sequential.rho")
    if rho <= 0:
        raise InputError("sequential.rho: the spending exponent must be positive")
    return SequentialInput(method=method, expected_n=expected_n, looks=looks, rho=rho)


def parse_input(raw: Any) -> StatsInput:
    """Validate a `twofold stats` document (already decoded from JSON)."""
    if not isinstance(raw, Mapping):
        raise InputError("the input must be a JSON object")
    alpha = _number(raw.get("alpha", 0.05), "alpha")
    if not 0 < alpha < 1:
        raise InputError(f"alpha: must be within (0, 1), got {alpha:g}")
    power = _number(raw.get("power", 0.8), "power")
    if not 0 < power < 1:
        raise InputError(f"power: must be within (0, 1), got {power:g}")
    correction = _choice(raw.get("correction", "bonferroni"), CORRECTIONS, "correction")
    control = raw.get("control", "control")
    if not isinstance(control, str) or not control:
        raise InputError("control: the control variant's name is required")
    split_raw = raw.get("expected_split")
    metrics_raw = raw.get("metrics")
    if not isinstance(metrics_raw, list) or not metrics_raw:
        raise InputError("metrics: a non-empty list is required")
    if split_raw is None:
        first = metrics_raw[0].get("variants") if isinstance(metrics_raw[0], Mapping) else None
        names = list(first) if isinstance(first, Mapping) else []
        split_raw = {name: 1.0 / len(names) for name in names} if names else {}
    if not isinstance(split_raw, Mapping) or len(split_raw) < 2:
        raise InputError("expected_split: map each variant (at least two) to its expected share")
    split = {str(k): _number(v, f"expected_split[{k!r}]", minimum=0) for k, v in split_raw.items()}
    total = sum(split.values())
    if total <= 0 or any(v == 0 for v in split.values()):
        raise InputError("expected_split: every share must be positive")
    split = {k: v / total for k, v in split.items()}
    if control not in split:
        raise InputError(f"control: {control!r} is not a variant of expected_split ({', '.join(split)})")
    metrics = [parse_metric(m, i, list(split)) for i, m in enumerate(metrics_raw)]
    names = [m.name for m in metrics]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"metrics: duplicate names {', '.join(duplicates)}")
    for metric in metrics:
        if control not in metric.variants:
            raise InputError(f"metric {metric.name!r}: no statistics for the control {control!r}")
    sequential = parse_sequential(raw.get("sequential"))
    if sequential is not None and correction == "holm":
        raise InputError("correction: holm has no sequential version; use bonferroni or risk-aware with sequential")
    units_raw = raw.get("units")
    units = None
    if units_raw is not None:
        if not isinstance(units_raw, Mapping):
            raise InputError("units: expected an object of variant -> unit count")
        units = {str(k): _number(v, f"units[{k!r}]", minimum=0, integer=True) for k, v in units_raw.items()}
    experiment = raw.get("experiment", "")
    det_raw = raw.get("deterioration_alpha")
    deterioration = None if det_raw is None else _number(det_raw, "deterioration_alpha")
    check_error_budget(alpha, power, deterioration)
    return StatsInput(alpha=alpha, power=power, correction=correction, control=control, expected_split=split,
                      metrics=metrics, sequential=sequential, experiment=str(experiment or ""), units=units,
                      deterioration_alpha=deterioration)


def check_error_budget(alpha: float, power: float, deterioration_alpha: float | None) -> None:
    """The risk-aware rule gives part of beta to the deterioration and quality tests: refuse a
    budget that leaves the success and guardrail tests nothing (the message names the field)."""
    det = alpha if deterioration_alpha is None else deterioration_alpha
    if not 0 < det < 1:
        raise InputError(f"deterioration_alpha: must be within (0, 1), got {det:g}")
    if 1 - power - det - SRM_THRESHOLD <= 0:
        raise InputError(f"deterioration_alpha: 1 - power - deterioration_alpha - {SRM_THRESHOLD} must be positive "
                         f"(power {power:g}, deterioration_alpha {det:g}); lower one of them")
