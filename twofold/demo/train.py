"""Train the demo's two personalization systems with the model server's Python API.

Both learn from the same exploration log (themes shown uniformly at random, `world.logged_interactions`):

- `home-ranker`: an XGBoost classifier of conversion on [user features, theme one-hot],
  exported to ONNX (the export refuses a model that does not match XGBoost). It ranks the
  themes for a user with one Score call: the candidates are the theme one-hots and the
  user's features are the shared context row.
- `home-linucb`: a LinUCB policy with one ridge regression per theme over the user's
  features, published as an ONNX graph with an exploration floor, so every decision has a
  propensity > 0 and the decision log supports off-policy evaluation. Before it is published,
  the model server evaluates it off-policy (SNIPS) on a held-out fifth of the log, whose
  propensities are known (uniform), and refuses it if it is worse than the logging policy.

`true_rates` then computes each system's population conversion rate under the world's true
probabilities, running the very ONNX graphs the server loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twofold.demo import world

RANKER = "home-ranker"
BANDIT = "home-linucb"


@dataclass(frozen=True)
class TrainedSystems:
    """The published versions and what training reported."""

    ranker: Any  # model_server.publish.Published
    bandit: Any
    ranker_metrics: dict[str, float]
    rows: int
    # Off-policy estimate of the bandit's conversion rate, and the logging policy's observed rate.
    bandit_snips: tuple[float, float, float]
    logged_rate: float


def train_systems(repository: Path, *, rows: int = 20_000, seed: int = 7) -> TrainedSystems:
    """Fit and publish both systems into the model repository `repository`."""
    from model_server.training import PolicyConfig, train_bandit, train_xgboost

    logged = world.logged_interactions(rows, seed)
    ranker = train_xgboost(world.ranker_rows(logged.x, logged.themes), logged.converted, name=RANKER,
                           repository=repository, task="classifier", seed=seed,
                           params={"n_estimators": 120, "max_depth": 4, "learning_rate": 0.1})
    result = train_bandit(logged.x, logged.themes, logged.converted.astype(np.float64), repository=repository,
                          name=BANDIT, arm_names=list(world.THEMES), feature_names=list(world.FEATURES),
                          config=PolicyConfig(policy="linucb", alpha=0.05, floor=0.02),
                          propensities=np.full(rows, 1.0 / len(world.THEMES)),
                          decision_ids=[f"log-{seed}-{i}" for i in range(rows)], gate_rule="not-worse")
    if result.published is None or result.report is None:
        raise RuntimeError(f"the model server refused the bandit policy: {result.reason}")
    training = dict(ranker.manifest.training or {})
    metrics = {k: float(v) for k, v in training.items() if k.startswith("holdout_")}
    snips = result.report.snips
    return TrainedSystems(ranker, result.published, metrics, rows, (snips.value, snips.ci_lower, snips.ci_upper),
                          float(result.report.logged.value))


@dataclass(frozen=True)
class Truth:
    """Population conversion rates per system, and the true lifts over the static experience."""

    rates: dict[str, float]

    def lift(self, system: str, baseline: str = "static") -> float:
        return self.rates[system] - self.rates[baseline]


def true_rates(trained: TrainedSystems, *, n: int = 200_000) -> Truth:
    """Each system's conversion rate over the user population, by Monte Carlo through its ONNX graph."""
    from model_server.runtime import LoadedModel

    ranker = LoadedModel(trained.ranker.manifest, trained.ranker.version, trained.ranker.path)
    bandit = LoadedModel(trained.bandit.manifest, trained.bandit.version, trained.bandit.path)
    k = len(world.THEMES)

    def rank(x: np.ndarray) -> np.ndarray:
        scores = np.column_stack([ranker.score(world.ranker_rows(x, np.full(len(x), t))) for t in range(k)])
        return np.argmax(scores, axis=1)

    def policy(x: np.ndarray) -> np.ndarray:
        feeds = {bandit.input_name: x, "random": np.full((len(x), bandit.manifest.random_width), 0.5, np.float32)}
        return bandit.run(feeds, ["probabilities"])[0].astype(np.float64)

    static = world.THEMES.index(world.STATIC_THEME)
    return Truth({
        "static": world.true_rate(lambda x: np.full(len(x), static), n),
        "ranker": world.true_rate(rank, n),
        "bandit": world.true_rate(policy, n),
    })
