"""Simulated users going through the SDK, exactly as a backend service would call it.

Phase 1, the visit: `decide()` on the experiment's flag, with the user's features and the
candidate themes; the flag's arm names the system (static, XGBoost ranker or bandit) and the
SDK calls it and logs the exposure. Phase 2, the outcome: a moment later the user converts or
bounces with the world's true probability for the theme actually shown, and the service
`track()`s it. Outcomes are drawn from pre-drawn uniforms, so a run is reproducible apart from
what the servers decide.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from client_sdk.async_client import AsyncClient
from client_sdk.results import Decision, Reason
from twofold.demo import world
from twofold.demo.progress import Progress


@dataclass(frozen=True)
class Visit:
    """What one simulated user was shown, and why."""

    unit: str
    variant: str | None
    system: str | None
    theme: int
    reason: Reason
    propensity: float | None
    decision_id: str | None


def shown_theme(decision: Decision) -> int:
    """The theme index a Decision shows.

    A bandit answers with a theme name, the ranker with theme indices best first, the static
    arm (and the flag's fallback or the default) with `{"theme": ...}`; anything else shows the
    static theme.
    """
    value = decision.value
    if isinstance(value, str) and value in world.THEMES:
        return world.THEMES.index(value)
    if isinstance(value, list) and value and isinstance(value[0], int) and 0 <= value[0] < len(world.THEMES):
        return int(value[0])
    if isinstance(value, dict) and value.get("theme") in world.THEMES:
        return world.THEMES.index(value["theme"])
    return world.THEMES.index(world.STATIC_THEME)


async def visit_all(client: AsyncClient, flag: str, units: Sequence[str], x: np.ndarray,
                    countries: Sequence[str], *, concurrency: int = 16, progress: Progress | None = None,
                    decision_ids: Sequence[str] | None = None) -> list[Visit]:
    """Phase 1: one `decide()` per user, `concurrency` at a time."""
    candidates = world.candidates()
    default = {"system": "static", "theme": world.STATIC_THEME}
    visits: list[Visit | None] = [None] * len(units)
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(units):
            i = next_index
            next_index += 1
            decision = await client.decide(flag, units[i], {"country": countries[i]}, features=x[i],
                                           candidates=candidates, default=default,
                                           decision_id=decision_ids[i] if decision_ids else None)
            visits[i] = Visit(units[i], decision.variant, decision.system, shown_theme(decision), decision.reason,
                              decision.propensity, decision.decision_id)
            if progress is not None:
                progress.advance()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [v for v in visits if v is not None]


@dataclass(frozen=True)
class Outcomes:
    """Per-user outcomes drawn from the true probabilities of the theme shown."""

    converted: np.ndarray
    bounced: np.ndarray
    amount: np.ndarray


def draw_outcomes(visits: Sequence[Visit], x: np.ndarray, seed: int) -> Outcomes:
    rng = np.random.default_rng(seed)
    n = len(visits)
    u_convert, u_bounce = rng.uniform(size=n), rng.uniform(size=n)
    amount = rng.uniform(20.0, 60.0, size=n)
    themes = np.array([v.theme for v in visits], dtype=np.int64)
    p = world.conversion_probability(x[:n])[np.arange(n), themes]
    return Outcomes(u_convert < p, u_bounce < world.BOUNCE_RATE, amount)


def track_outcomes(client: AsyncClient, visits: Sequence[Visit], outcomes: Outcomes) -> int:
    """Phase 2: `track()` each conversion (with its basket value) and each bounce; returns events sent."""
    sent = 0
    for visit, converted, bounced, amount in zip(visits, outcomes.converted, outcomes.bounced, outcomes.amount,
                                                 strict=True):
        if converted:
            client.track("purchase", visit.unit, float(round(amount, 2)), properties={"source": "home"})
            sent += 1
        if bounced:
            client.track("bounce", visit.unit)
            sent += 1
    return sent
