"""The Python API for training and publishing models (what `twofold train` and the demo call).

    from model_server.training import train_xgboost, init_bandit, train_bandit, train_bandit_from_lake

    train_xgboost(x, y, name="home-ranker", repository="models", feature_names=[...])
    init_bandit(name="home-linucb", repository="models", arms=["a", "b"], feature_names=[...])
    train_bandit(x, arms, rewards, propensities=p, name="home-linucb", repository="models", ...)
    train_bandit_from_lake("data/lake", name="home-linucb", repository="models", reward_event="purchase")

Bandit training fits the candidate on the older part of the log, scores it with IPS and
SNIPS on the newer part (held out, so the estimate is not flattered by its own training data)
and publishes it only if the evaluation gate lets it through. The report is stored in the
new version's manifest under `evaluation`.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from model_server.bandits import PolicyConfig, fit_policy, publish_policy, publish_policy_graph, untrained_arms
from model_server.export_xgboost import ExportError, export_model, export_model_file, train_xgboost
from model_server.lake_training import load_decisions
from model_server.manifest import MANIFEST_FILE, Manifest, read_manifest
from model_server.offline_eval import (
    DEFAULT_GATE_CONFIDENCE,
    DEFAULT_MARGIN,
    DEFAULT_MIN_ESS,
    GateDecision,
    OffPolicyReport,
    evaluate,
    gate,
)
from model_server.publish import Published
from model_server.randomness import uniforms_for

__all__ = ["BanditResult", "ExportError", "PolicyConfig", "export_model", "export_model_file", "init_bandit",
           "latest_manifest", "policy_probabilities", "train_bandit", "train_bandit_from_lake", "train_xgboost"]


@dataclass(frozen=True)
class BanditResult:
    """What a training run did: the published version (None when the gate refused it) and why."""

    published: Published | None
    report: OffPolicyReport | None
    reason: str
    rows_train: int
    rows_evaluated: int
    rows_dropped: int = 0
    gate: GateDecision | None = None  # the numbers the gate decided on (None: nothing to evaluate against)


def init_bandit(*, repository: str | os.PathLike[str], name: str, arms: Sequence[str],
                feature_names: Sequence[str], config: PolicyConfig | None = None) -> Published:
    """Publish a policy that has seen no data: it explores all arms uniformly until trained."""
    config = config or PolicyConfig()
    return publish_policy(repository=repository, name=name, arms=arms, feature_names=feature_names,
                          stats=untrained_arms(len(feature_names), len(arms), config.ridge), config=config)


def policy_probabilities(graph: bytes, x: np.ndarray, decision_ids: Sequence[str], random_width: int) -> np.ndarray:
    """The candidate graph's arm distribution for each logged context (its own randomness replayed)."""
    import onnxruntime as ort

    from model_server.runtime import session_options

    session = ort.InferenceSession(graph, session_options(), providers=["CPUExecutionProvider"])
    feeds = {"context": np.asarray(x, dtype=np.float32), "random": uniforms_for(list(decision_ids), random_width)}
    return np.asarray(session.run(["probabilities"], feeds)[0], dtype=np.float64)


def train_bandit(x: np.ndarray, arms: Sequence[str] | np.ndarray, rewards: np.ndarray, *,
                 repository: str | os.PathLike[str], name: str, arm_names: Sequence[str],
                 feature_names: Sequence[str], config: PolicyConfig | None = None,
                 propensities: np.ndarray | None = None, decision_ids: Sequence[str] | None = None,
                 holdout_fraction: float = 0.2, gate_rule: str = "not-worse",
                 gate_margin: float = DEFAULT_MARGIN, gate_confidence: float = DEFAULT_GATE_CONFIDENCE,
                 gate_min_ess: float = DEFAULT_MIN_ESS, extra_training: dict[str, Any] | None = None) -> BanditResult:
    """Fit a policy on logged rows (oldest first), evaluate it off-policy, publish if the gate allows.

    `arms` are arm names or indices into `arm_names`. Without `propensities` there is nothing to
    evaluate against: the candidate is fitted on every row and published ungated. The gate
    (`model_server.offline_eval.gate`) decides on the evaluation rows with `gate_margin`,
    `gate_confidence` and `gate_min_ess`.
    """
    config = config or PolicyConfig()
    x = np.asarray(x, dtype=np.float64)
    rewards = np.asarray(rewards, dtype=np.float64)
    index = {a: i for i, a in enumerate(arm_names)}
    raw_arms = np.asarray(arms)
    if raw_arms.dtype.kind in "iu":
        arm_idx = raw_arms.astype(np.int64)
        known = (arm_idx >= 0) & (arm_idx < len(arm_names))
    else:
        arm_idx = np.array([index.get(str(a), -1) for a in raw_arms], dtype=np.int64)
        known = arm_idx >= 0
    if x.ndim != 2 or x.shape[1] != len(feature_names) or len(x) != len(arm_idx) or len(x) != len(rewards):
        raise ValueError(f"need an (n, {len(feature_names)}) context matrix with one arm and reward per row")
    dropped = int((~known).sum())
    x, arm_idx, rewards = x[known], arm_idx[known], rewards[known]
    ids = list(np.asarray(decision_ids)[known]) if decision_ids is not None else [f"row-{i}" for i in range(len(x))]
    if len(x) == 0:
        raise ValueError("no logged rows with a known arm")
    info = {"rows_dropped_unknown_arm": dropped, **(extra_training or {})}
    if propensities is None:
        graph, training = fit_policy(x, arm_idx, rewards, len(arm_names), config)
        published = publish_policy_graph(repository=repository, name=name, arms=arm_names,
                                         feature_names=feature_names, graph=graph, config=config,
                                         training={**training, **info, "evaluated": False})
        return BanditResult(published, None, "no propensities: published without evaluation", len(x), 0, dropped)
    props = np.asarray(propensities, dtype=np.float64)[known]
    n_eval = round(len(x) * holdout_fraction)
    if holdout_fraction > 0 and (n_eval < 2 or len(x) - n_eval < 1):
        raise ValueError(f"{len(x)} rows are too few for a {holdout_fraction:.0%} evaluation hold-out")
    train = slice(0, len(x) - n_eval) if n_eval else slice(0, len(x))
    held = slice(len(x) - n_eval, len(x)) if n_eval else slice(0, len(x))
    graph, training = fit_policy(x[train], arm_idx[train], rewards[train], len(arm_names), config)
    probs = policy_probabilities(graph, x[held], ids[held], config.random_width(len(arm_names)))
    target = probs[np.arange(len(probs)), arm_idx[held]]
    report = evaluate(rewards[held], props[held], target)
    decision = gate(report, gate_rule, margin=gate_margin, confidence=gate_confidence, min_ess=gate_min_ess)
    if not decision.publish:
        return BanditResult(None, report, decision.reason, train.stop - train.start, held.stop - held.start, dropped,
                            decision)
    evaluation = {**report.to_dict(), "gate": gate_rule, "decision": decision.reason,
                  "gate_decision": decision.to_dict(), "in_sample": n_eval == 0}
    published = publish_policy_graph(repository=repository, name=name, arms=arm_names,
                                     feature_names=feature_names, graph=graph, config=config,
                                     training={**training, **info}, evaluation=evaluation)
    return BanditResult(published, report, decision.reason, train.stop - train.start, held.stop - held.start,
                        dropped, decision)


def latest_manifest(repository: str | os.PathLike[str], name: str) -> Manifest | None:
    """The newest readable version's manifest of `name`, or None if there is none."""
    from pathlib import Path

    model_dir = Path(repository) / name
    if not model_dir.is_dir():
        return None
    for number in sorted((int(p.name) for p in model_dir.iterdir() if p.name.isdigit()), reverse=True):
        version_dir = model_dir / str(number)
        if (version_dir / MANIFEST_FILE).exists():
            try:
                return read_manifest(version_dir)
            except ValueError:
                continue
    return None


def train_bandit_from_lake(lake: str | os.PathLike[str], *, repository: str | os.PathLike[str], name: str,
                           reward_event: str, window: dt.timedelta = dt.timedelta(hours=1),
                           reward: str = "occurrence", config: PolicyConfig | None = None,
                           arm_names: Sequence[str] | None = None, feature_names: Sequence[str] | None = None,
                           holdout_fraction: float = 0.2, gate_rule: str = "not-worse",
                           gate_margin: float = DEFAULT_MARGIN, gate_confidence: float = DEFAULT_GATE_CONFIDENCE,
                           gate_min_ess: float = DEFAULT_MIN_ESS, as_of: dt.datetime | None = None,
                           since: dt.datetime | None = None) -> BanditResult:
    """Fit `name` from the lake's decisions and events and publish its next version.

    Arms and feature names come from the newest published version unless given; the policy
    kind and knobs too, unless `config` is given.
    """
    current = latest_manifest(repository, name)
    if arm_names is None or feature_names is None:
        if current is None or not current.is_policy:
            raise LookupError(f"no published policy {name!r} in {repository}: pass arm and feature names")
        arm_names = arm_names or current.arms
        feature_names = feature_names or current.feature_names
    if config is None:
        if current is not None and current.is_policy:
            t = current.training
            config = PolicyConfig(policy=str(t.get("policy", "linucb")), alpha=float(t.get("alpha", 1.0)),
                                  epsilon=float(t.get("epsilon", 0.1)), scale=float(t.get("scale", 1.0)),
                                  draws=int(t.get("draws", 64)), floor=float(t.get("floor", 0.01)),
                                  ridge=float(t.get("ridge", 1.0)), base=str(t.get("base", "linear")))
        else:
            config = PolicyConfig()
    logged = load_decisions(lake, name, reward_event, window, reward, as_of=as_of, since=since)
    if logged.features.shape[1] != len(feature_names):
        raise ValueError(f"logged decisions have {logged.features.shape[1]} features, the policy "
                         f"{len(feature_names)}")
    extra = {"source": "lake", "reward_event": reward_event, "reward": reward,
             "window_seconds": window.total_seconds(), "logged_versions": sorted(set(logged.versions))}
    return train_bandit(logged.features, logged.arms, logged.rewards, repository=repository, name=name,
                        arm_names=arm_names, feature_names=feature_names, config=config,
                        propensities=logged.propensity, decision_ids=logged.decision_ids,
                        holdout_fraction=holdout_fraction, gate_rule=gate_rule, gate_margin=gate_margin,
                        gate_confidence=gate_confidence, gate_min_ess=gate_min_ess, extra_training=extra)
