"""A synthetic lake for benchmarks, tests and demos: realistic shape, known effects, written fast.

It writes contract-3 Parquet directly with pyarrow (`<root>/<table>/date=YYYY-MM-DD/*.parquet`, the
lake writer's schema) instead of going through the write-ahead log, because tens of millions of
rows through a durable log would benchmark the log, not the analysis. Columns are produced with
numpy and Arrow compute (no Python loop per row), in chunks, so 30M events need a few hundred MB.

The data carries what the analysis must cope with: units exposed several times, a few units
exposed to both variants, duplicated exposures and events (retries), exposures that use both the
full Confidence variant name and the short one, events before exposure (the CUPED covariate) and
heavy-tailed purchase values (worth capping). Treatment units get `effect` more purchases, clicks
and revenue; guardrails (page load, crashes) are unchanged.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twofold.lake import TABLE_SCHEMAS, write_parquet

DAY_US = 86_400_000_000
# Event mix per unit activity: name, share of events, has a value.
EVENT_MIX: tuple[tuple[str, float], ...] = (
    ("session_start", 0.30), ("click", 0.38), ("purchase", 0.10), ("page_load", 0.17), ("crash", 0.03),
    ("anr", 0.02),
)


@dataclass(frozen=True)
class SyntheticLake:
    """What was written (row counts include the deliberate duplicates)."""

    root: Path
    exposures: int
    events: int
    units: int
    start: dt.date
    days: int


def _ids(prefix: str, values: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(pa.scalar(prefix), pa.array(values).cast(pa.string()), "")


def _dimensions(rng: np.random.Generator, units: int, dimensions: dict[str, tuple[str, ...]] | None) -> pa.Array:
    """Per unit, the JSON of one value per dimension drawn uniformly (null when none are declared)."""
    if not dimensions:
        return pa.nulls(units, pa.string())
    text = pa.array(np.full(units, "{"))
    for i, (name, values) in enumerate(sorted(dimensions.items())):
        drawn = pa.array(np.asarray(values)[rng.integers(0, len(values), size=units)])
        prefix = pa.scalar(("," if i else "") + f'"{name}":"')
        text = pc.binary_join_element_wise(text, prefix, drawn, pa.scalar('"'), "")
    return pc.binary_join_element_wise(text, pa.scalar("}"), "")


def _write_by_day(root: Path, table: str, columns: dict[str, pa.Array], ts_us: np.ndarray, part: str) -> None:
    schema = TABLE_SCHEMAS[table]
    day = ts_us // DAY_US
    order = np.argsort(day, kind="stable")
    day_sorted = day[order]
    cut = np.flatnonzero(np.diff(day_sorted)) + 1
    bounds = np.concatenate([[0], cut, [day_sorted.size]])
    arrays = [columns[name].take(pa.array(order)) if name != "ts" else
              pa.array(ts_us[order], type=pa.int64()).cast(pa.timestamp("us", tz="UTC"))
              for name in schema.names]
    whole = pa.Table.from_arrays(arrays, schema=schema)
    for lo, hi in itertools.pairwise(bounds):
        date = (dt.datetime(1970, 1, 1) + dt.timedelta(days=int(day_sorted[lo]))).date().isoformat()
        folder = root / table / f"date={date}"
        folder.mkdir(parents=True, exist_ok=True)
        write_parquet(whole.slice(int(lo), int(hi - lo)), folder / f"{part}.parquet", table)


def write_synthetic_lake(root: str | os.PathLike[str], *, exposures: int = 10_000_000, events: int = 30_000_000,
                         flag: str = "home-ranking", variants: tuple[str, str] = ("control", "bandit"),
                         start: dt.date = dt.date(2026, 11, 1), days: int = 28, effect: float = 0.03,
                         seed: int = 7, chunk: int = 4_000_000,
                         dimensions: dict[str, tuple[str, ...]] | None = None) -> SyntheticLake:
    """Write `exposures` exposure rows and `events` event rows for one two-arm experiment on `flag`.

    `dimensions` (e.g. {"country": ("SE", "US")}) gives every unit one value per dimension, recorded
    in the exposures' `dimensions` JSON column (null without it, as a flag declaring none).
    """
    rng = np.random.default_rng(seed)
    base = Path(root)
    units = max(2, exposures // 2)
    start_us = int(dt.datetime(start.year, start.month, start.day, tzinfo=dt.UTC).timestamp() * 1_000_000)
    # Per unit: first exposure time, arm, activity (drives both pre- and post-exposure events: CUPED).
    first_us = start_us + rng.integers(0, days * DAY_US, size=units)
    arm = rng.integers(0, 2, size=units).astype(np.int8)
    activity = rng.lognormal(0.0, 0.8, size=units)
    lift = np.where(arm == 1, 1.0 + effect, 1.0)

    # Exposures: each unit's first, then repeats at later times; 0.1% of units also see the other arm.
    unit_idx = np.concatenate([np.arange(units), rng.integers(0, units, size=exposures - units)])
    ts = first_us[unit_idx] + np.where(np.arange(exposures) < units, 0,
                                       rng.integers(0, 3 * DAY_US, size=exposures))
    ts = np.minimum(ts, start_us + days * DAY_US - 1)
    shown_arm = arm[unit_idx].copy()
    flip = rng.random(exposures) < 0.0005
    shown_arm[flip] = 1 - shown_arm[flip]
    full = rng.random(exposures) < 0.8
    names = np.asarray([f"flags/{flag}/variants/{variants[0]}", f"flags/{flag}/variants/{variants[1]}",
                        variants[0], variants[1]])
    variant_col = pa.array(names[shown_arm + np.where(full, 0, 2)])
    exposure_ids = np.arange(exposures)
    dup = rng.random(exposures) < 0.01  # retried writes: the same exposure id twice
    exposure_ids = np.concatenate([exposure_ids, exposure_ids[dup]])
    rows = np.concatenate([np.arange(exposures), np.flatnonzero(dup)])
    unit_col = _ids("u", unit_idx[rows])
    n_rows = rows.size
    columns = {
        "exposure_id": _ids("x", exposure_ids), "unit": unit_col,
        "flag": pa.array(np.full(n_rows, flag)), "rule": pa.array(np.full(n_rows, f"{flag}-experiment")),
        "variant": variant_col.take(pa.array(rows)), "assignment_id": _ids("a", unit_idx[rows] % 10_000),
        "resolve_id": _ids("r", rows), "client": pa.array(np.full(n_rows, "backend")),
        "dimensions": _dimensions(rng, units, dimensions).take(pa.array(unit_idx[rows])),
    }
    _write_by_day(base, "exposures", columns, ts[rows], "part-0")

    # Events: units drawn in proportion to activity (x lift for the treatment's engagement events).
    mix_names = np.asarray([n for n, _ in EVENT_MIX])
    mix_p = np.asarray([p for _, p in EVENT_MIX])
    engaged = np.cumsum(activity * lift)
    neutral = np.cumsum(activity)
    written = 0
    part = 0
    while written < events:
        size = min(chunk, events - written)
        kind = rng.choice(mix_names.size, size=size, p=mix_p)
        is_engagement = np.isin(mix_names[kind], ("click", "purchase"))
        u_eng = np.searchsorted(engaged, rng.random(size) * engaged[-1])
        u_neu = np.searchsorted(neutral, rng.random(size) * neutral[-1])
        unit = np.minimum(np.where(is_engagement, u_eng, u_neu), units - 1)
        # Offsets from the first exposure: a quarter before it (covariate), the rest within 10 days after.
        offset = np.where(rng.random(size) < 0.25, -rng.integers(1, 14 * DAY_US, size=size),
                          rng.integers(0, 10 * DAY_US, size=size))
        ev_ts = first_us[unit] + offset
        value = np.full(size, np.nan)
        purchase = mix_names[kind] == "purchase"
        value[purchase] = rng.lognormal(3.0, 1.0, size=int(purchase.sum())) * lift[unit[purchase]]
        load = mix_names[kind] == "page_load"
        value[load] = rng.gamma(4.0, 80.0, size=int(load.sum()))
        ids = np.arange(written, written + size)
        dup = rng.random(size) < 0.01
        rows = np.concatenate([np.arange(size), np.flatnonzero(dup)])
        columns = {
            "event_id": _ids("e", ids[rows]), "unit": _ids("u", unit[rows]),
            "name": pa.array(mix_names[kind[rows]]),
            "value": pa.array(value[rows], mask=np.isnan(value[rows])),
            "properties": pa.array(np.full(rows.size, "{}")),
        }
        _write_by_day(base, "events", columns, ev_ts[rows], f"part-{part}")
        written += size
        part += 1
    return SyntheticLake(root=base, exposures=exposures, events=events, units=units, start=start, days=days)
