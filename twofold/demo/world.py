"""The demo's synthetic world: users, content themes and a known ground truth.

A homepage shows one content theme per visit. Whether a user converts depends on who the
user is and on the theme shown, through a function the demo knows exactly, so the demo can
check the analysis against the truth instead of trusting it:

    p(convert | x, theme k) = sigmoid(b_k + w_k . x  [+ 1.6 if k is "deals" and x4 < 0.3])

The old static experience shows "editorial" to everyone. A personalized system that shows
each user a better theme converts more; how much more is computed by Monte Carlo over the
user distribution (`true_rate`), separately from the experiment's own random draws. The
threshold term is something a tree model learns and a linear bandit only approximates.

A second, guardrail outcome ("bounce") does not depend on the theme at all: its true effect
is zero, and a correct analysis finds it non-inferior rather than significant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

THEMES: tuple[str, ...] = ("editorial", "sports", "music", "deals")
STATIC_THEME = "editorial"
FEATURES: tuple[str, ...] = ("sports_affinity", "music_affinity", "price_sensitivity", "returning", "age")
COUNTRIES: tuple[str, ...] = ("SE", "US", "DE", "BR")
BOUNCE_RATE = 0.30

_W = np.array([
    [0.0, 0.0, 0.0, 0.0, 0.0],    # editorial
    [1.8, -0.5, 0.3, 0.0, 0.0],   # sports
    [-1.0, 1.6, 0.0, 0.6, 0.0],   # music
    [0.0, 0.0, -0.6, -0.4, 0.0],  # deals
])
_B = np.array([-2.3, -3.1, -3.0, -2.6])


def sample_users(n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` users' feature rows (float32, columns as in FEATURES)."""
    return np.column_stack([
        rng.uniform(0, 1, n),                      # sports affinity
        rng.uniform(0, 1, n),                      # music affinity
        rng.normal(0, 1, n),                       # price sensitivity
        rng.integers(0, 2, n).astype(np.float64),  # returning visitor
        rng.uniform(0, 1, n),                      # age (scaled)
    ]).astype(np.float32)


def conversion_probability(x: np.ndarray) -> np.ndarray:
    """The true conversion probability of each user (rows) for each theme (columns)."""
    z = _B[None, :] + x.astype(np.float64) @ _W.T
    z[:, THEMES.index("deals")] += 1.6 * (x[:, 4] < 0.3)
    return 1.0 / (1.0 + np.exp(-z))


def candidates() -> np.ndarray:
    """One candidate row per theme (one-hot); the ranker scores [user features, candidate row]."""
    return np.eye(len(THEMES), dtype=np.float32)


def ranker_rows(x: np.ndarray, themes: np.ndarray) -> np.ndarray:
    """Training rows for the ranker: the user's features followed by the shown theme's one-hot."""
    return np.hstack([x, np.eye(len(THEMES), dtype=np.float32)[themes]]).astype(np.float32)


@dataclass(frozen=True)
class Logged:
    """Interactions logged under a uniformly random theme: the training data of both systems."""

    x: np.ndarray
    themes: np.ndarray
    converted: np.ndarray


def logged_interactions(n: int, seed: int) -> Logged:
    """`n` visits where the theme was chosen uniformly at random (an exploration log)."""
    rng = np.random.default_rng(seed)
    x = sample_users(n, rng)
    themes = rng.integers(0, len(THEMES), n)
    p = conversion_probability(x)[np.arange(n), themes]
    return Logged(x, themes, (rng.uniform(size=n) < p).astype(np.int64))


def true_rate(choose: Callable[[np.ndarray], np.ndarray], n: int = 200_000, seed: int = 12345) -> float:
    """The population conversion rate of a system, by Monte Carlo over `n` fresh users.

    `choose(x)` returns, per user, either a theme index (deterministic systems) or a row of
    probabilities over themes (randomized systems such as a bandit).
    """
    x = sample_users(n, np.random.default_rng(seed))
    p = conversion_probability(x)
    choice = np.asarray(choose(x))
    if choice.ndim == 2:
        return float(np.mean(np.sum(choice * p, axis=1)))
    return float(np.mean(p[np.arange(n), choice.astype(np.int64)]))
