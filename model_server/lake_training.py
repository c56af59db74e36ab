"""Reading logged decisions and their rewards from the lake (contract 3) with DuckDB.

A decision's reward is built from the events of the same unit named `reward_event` within
`window` after the decision: `occurrence` (1 if any, else 0), `count` or `value` (the sum of
their values, null counted as 0). Both tables are deduplicated by id, as contract 3 asks of
readers. An event inside the windows of two decisions of the same unit counts for both:
the window is the attribution rule, stated rather than hidden. Decisions whose window has not
closed yet (relative to `as_of`) are left out, since their reward is not known.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass

import numpy as np

REWARDS = ("occurrence", "count", "value")


@dataclass(frozen=True)
class LoggedDecisions:
    """Decisions of one model with their rewards, oldest first."""

    decision_ids: list[str]
    units: list[str]
    arms: list[str]
    versions: list[str]
    propensity: np.ndarray
    features: np.ndarray
    rewards: np.ndarray

    def __len__(self) -> int:
        return len(self.decision_ids)


def load_decisions(lake: str | os.PathLike[str], model: str, reward_event: str, window: dt.timedelta,
                   reward: str = "occurrence", as_of: dt.datetime | None = None,
                   since: dt.datetime | None = None) -> LoggedDecisions:
    """The model's logged decisions joined with their rewards (see the module docstring)."""
    import duckdb

    if reward not in REWARDS:
        raise ValueError(f"reward must be one of {', '.join(REWARDS)}; got {reward!r}")
    if window.total_seconds() <= 0:
        raise ValueError("the reward window must be positive")
    from twofold.lake_read import table_source

    root = os.fspath(lake)
    as_of = as_of or dt.datetime.now(dt.UTC)
    since = since or dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    decisions = table_source(con, root, "decisions", union_by_name=True)
    if decisions is None:
        raise FileNotFoundError(f"no decisions table under {root}")
    events = table_source(con, root, "events", union_by_name=True)
    event_source = (f"SELECT * FROM {events.sql}"
                    if events else
                    "SELECT NULL::VARCHAR AS event_id, NULL::TIMESTAMPTZ AS ts, NULL::VARCHAR AS unit, "
                    "NULL::VARCHAR AS name, NULL::DOUBLE AS value WHERE false")
    window_us = int(window.total_seconds() * 1_000_000)
    query = f"""
        WITH d AS (
            SELECT decision_id, ts, unit, model_version, arm, propensity, features
            FROM {decisions.sql}
            WHERE model = $model AND ts >= $since AND ts + to_microseconds($window) <= $as_of
            QUALIFY row_number() OVER (PARTITION BY decision_id ORDER BY ts) = 1
        ), e AS (
            SELECT event_id, ts, unit, value FROM ({event_source})
            WHERE name = $event
            QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY ts) = 1
        )
        SELECT d.decision_id, d.unit, d.arm, d.model_version, d.propensity, d.features,
               count(e.event_id) AS n_events, coalesce(sum(e.value), 0) AS value_sum
        FROM d LEFT JOIN e
          ON e.unit = d.unit AND e.ts >= d.ts AND e.ts < d.ts + to_microseconds($window)
        GROUP BY ALL
        ORDER BY min(d.ts), d.decision_id
    """
    rows = con.execute(query, {"model": model, "since": since, "as_of": as_of, "event": reward_event,
                               "window": window_us}).fetchall()
    con.close()
    if not rows:
        raise LookupError(f"no decisions of model {model!r} with a closed reward window in {root}")
    ids, units, arms, versions, props, feats, n_events, value_sum = zip(*rows, strict=True)
    widths = {len(f) for f in feats}
    if len(widths) != 1:
        raise ValueError(f"decisions of model {model!r} carry feature rows of different widths {sorted(widths)}")
    counts = np.asarray(n_events, dtype=np.float64)
    reward_values = {"occurrence": (counts > 0).astype(np.float64), "count": counts,
                     "value": np.asarray(value_sum, dtype=np.float64)}[reward]
    return LoggedDecisions(list(ids), list(units), list(arms), list(versions),
                           np.asarray(props, dtype=np.float64), np.asarray(feats, dtype=np.float64), reward_values)
