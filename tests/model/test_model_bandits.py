"""Bandit policies as ONNX graphs, checked against independent numpy/scipy/statsmodels computations."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from scipy import linalg, stats
from statsmodels.stats.weightstats import DescrStatsW

from model_server.bandits import LinearArms, PolicyConfig, build_policy_graph, fit_linear_arms, untrained_arms
from model_server.manifest import read_manifest
from model_server.offline_eval import evaluate, gate
from model_server.randomness import uniforms, uniforms_for
from model_server.repository import ModelRepository
from model_server.runtime import session_options
from model_server.training import init_bandit, train_bandit
from tests.model.conftest import ARMS, CONTEXT, bandit_log
from twofold.testing import BackgroundLoop

Fitted = tuple[np.ndarray, np.ndarray, np.ndarray, LinearArms]


def session(graph: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(graph, session_options())


def run(graph: bytes, x: np.ndarray, ids: list[str], width: int) -> dict[str, np.ndarray]:
    names = ["scores", "probabilities", "arm", "propensity"]
    out = session(graph).run(names, {"context": x.astype(np.float32), "random": uniforms_for(ids, width)})
    return dict(zip(names, out, strict=True))


@pytest.fixture(scope="module")
def fitted() -> Fitted:
    x, arms, rewards = bandit_log(4000, seed=3)
    return x, arms, rewards, fit_linear_arms(x, arms, rewards, len(ARMS), ridge=1.0)


def test_ridge_fit_matches_least_squares(fitted: Fitted) -> None:
    x, arms, rewards, stats_ = fitted
    for k in range(len(ARMS)):
        z = np.hstack([x[arms == k], np.ones(((arms == k).sum(), 1))])
        # Ridge as an augmented least-squares problem, solved independently by LAPACK.
        aug = np.vstack([z, np.sqrt(1.0) * np.eye(z.shape[1])])
        target = np.concatenate([rewards[arms == k], np.zeros(z.shape[1])])
        theta, *_ = linalg.lstsq(aug, target)
        np.testing.assert_allclose(stats_.theta[k], theta, atol=1e-9)
        np.testing.assert_allclose(stats_.a_inv[k], np.linalg.inv(z.T @ z + np.eye(z.shape[1])), atol=1e-12)


def reference(st: LinearArms, config: PolicyConfig, x: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores and probabilities as the bandits module docstring defines them, in float64 numpy."""
    n, n_arms = len(x), st.theta.shape[0]
    z = np.hstack([x, np.ones((n, 1))])
    mu = z @ st.theta.T
    sd = np.sqrt(np.einsum("nd,kde,ne->nk", z, st.a_inv, z))

    def uniform_over_best(scores: np.ndarray) -> np.ndarray:
        best = (scores == scores.max(axis=-1, keepdims=True)).astype(np.float64)
        return best / best.sum(axis=-1, keepdims=True)

    if config.policy == "linucb":
        scores = mu + config.alpha * sd
        policy = uniform_over_best(scores)
    elif config.policy == "epsilon-greedy":
        scores = mu
        policy = (1 - config.epsilon) * uniform_over_best(mu) + config.epsilon / n_arms
    else:  # Thompson: the share of M Box-Muller posterior draws each arm wins
        scores, m = mu, config.draws
        half = m * n_arms
        normal = np.sqrt(-2 * np.log(u[:, 1:1 + half])) * np.cos(2 * np.pi * u[:, 1 + half:])
        draws = mu[:, None, :] + config.scale * sd[:, None, :] * normal.reshape(n, m, n_arms)
        wins = (draws == draws.max(axis=2, keepdims=True)).sum(axis=1)
        policy = wins / wins.sum(axis=1, keepdims=True)
    return scores, (1 - n_arms * config.floor) * policy + config.floor


CONFIGS = {"linucb": PolicyConfig(policy="linucb", alpha=0.7, floor=0.05),
           "thompson": PolicyConfig(policy="thompson", scale=2.0, draws=16, floor=0.01),
           "epsilon-greedy": PolicyConfig(policy="epsilon-greedy", epsilon=0.3, floor=0.01)}


@pytest.mark.parametrize("n_arms", [3, 1])  # PolicyConfig allows one arm (a manifest needs two)
@pytest.mark.parametrize("policy", list(CONFIGS))
def test_policies_match_a_numpy_reference(fitted: Fitted, policy: str, n_arms: int) -> None:
    x, _, rewards, st = fitted
    if n_arms == 1:
        st = fit_linear_arms(x, np.zeros(len(x), dtype=np.int64), rewards, 1)
    config = CONFIGS[policy]
    rows = np.random.default_rng(5).normal(size=(500, 3))
    ids = [f"{policy}-{i}" for i in range(500)]
    u = uniforms_for(ids, config.random_width(n_arms))
    out = run(build_policy_graph(st, config), rows, ids, config.random_width(n_arms))
    scores, probabilities = reference(st, config, rows, u.astype(np.float64))
    np.testing.assert_allclose(out["scores"], scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["probabilities"], probabilities, atol=1e-6)
    assert (out["probabilities"] >= config.floor - 1e-7).all()
    # The arm is the inverse-CDF draw with random[:, 0] from the probabilities as served, and its propensity theirs.
    cdf = np.cumsum(out["probabilities"], axis=1, dtype=np.float32)
    np.testing.assert_array_equal(out["arm"], np.minimum((cdf < u[:, :1]).sum(axis=1), n_arms - 1))
    np.testing.assert_array_equal(out["propensity"], out["probabilities"][np.arange(500), out["arm"]])
    assert out["arm"].dtype == np.int64 and out["arm"].shape == out["propensity"].shape == (500,)


@pytest.mark.parametrize(("width", "n_arms"), [(3, 3), (6, 2), (20, 5)])
@pytest.mark.parametrize("policy", ["linucb", "epsilon-greedy"])
def test_untrained_policies_explore_uniformly(policy: str, width: int, n_arms: int) -> None:
    """Before any data every arm ties exactly (graphs built before summed the arms' LinUCB bonus in different
    orders, so for widths like 6 x 2 or 20 x 5 a rounding difference picked one arm)."""
    rows = np.random.default_rng(7).normal(size=(300, width)) * 3
    out = run(build_policy_graph(untrained_arms(width, n_arms), PolicyConfig(policy=policy)), rows,
              [str(i) for i in range(300)], 1)
    assert (out["probabilities"] == out["probabilities"][:, :1]).all()
    np.testing.assert_allclose(out["probabilities"], 1 / n_arms, atol=1e-6)


def test_policy_graphs_keep_their_node_budget(fitted: Fitted) -> None:
    """On cold caches every node costs time (bandits module docstring): a graph that grows is a regression."""
    _, _, _, st = fitted
    counts = {policy: len(onnx.load_from_string(build_policy_graph(st, config)).graph.node)
              for policy, config in CONFIGS.items()}
    assert counts == {"linucb": 18, "thompson": 28, "epsilon-greedy": 13}


@pytest.mark.parametrize("policy", ["linucb", "thompson", "epsilon-greedy"])
def test_arms_are_drawn_from_the_stated_distribution(fitted: Fitted, policy: str) -> None:
    """Across many decision ids for one context, arm frequencies match `probabilities` (chi-square)."""
    _, _, _, st = fitted
    config = PolicyConfig(policy=policy, epsilon=0.4, floor=0.1, draws=8, scale=3.0)
    n = 20000
    rows = np.tile([[0.2, 0.1, 0.0]], (n, 1))
    out = run(build_policy_graph(st, config), rows, [f"{policy}-{i}" for i in range(n)], config.random_width(3))
    assert (out["propensity"] >= 0.1 - 1e-6).all()
    probs = out["probabilities"].astype(np.float64).mean(axis=0)  # Thompson's shares vary with the draws; average them
    observed = np.bincount(out["arm"], minlength=3)
    expected = probs / probs.sum() * n
    result = stats.chisquare(observed, expected * (observed.sum() / expected.sum()))
    assert result.pvalue > 1e-4, (observed, probs)
    np.testing.assert_allclose(out["propensity"], out["probabilities"][np.arange(n), out["arm"]], atol=1e-7)


def test_decisions_replay_across_sessions(tmp_path: Path) -> None:
    published = init_bandit(repository=tmp_path, name="b", arms=ARMS, feature_names=CONTEXT,
                            config=PolicyConfig(policy="thompson", draws=8))
    with BackgroundLoop() as loop:
        one, two = ModelRepository(tmp_path, poll_seconds=0), ModelRepository(tmp_path, poll_seconds=0)
        loop.run(one.refresh())
        loop.run(two.refresh())
        a, b = one.get("b"), two.get("b")
        assert a.session is not b.session
        x = np.array([[0.3, 0.2, 1.0]], dtype=np.float32)
        picks = [a.decide(x, f"id-{i}")[1] for i in range(300)]
        assert picks == [b.decide(x, f"id-{i}")[1] for i in range(300)]
        assert len(set(picks)) == 3  # and different ids do explore
    assert published.manifest.random_width == 1 + 2 * 8 * 3
    assert uniforms("x", 5).min() > 0 and uniforms("x", 5).max() < 1


@pytest.mark.parametrize(("count", "digest"), [(1, "8ce473ba6f03607a"), (2, "fb6aebc135bfad17"),
                                              (5, "d56a1a31353727b0"), (16, "6f7d89e5413f8ea5"),
                                              (17, "3c2cbd98182394a0"), (385, "653f13872db11021")])
def test_uniforms_never_change(count: int, digest: str) -> None:
    """The numbers behind every logged decision, pinned on both sides of the scalar/numpy threshold."""
    rows = uniforms_for([f"pin-{i}" for i in range(200)], count)
    assert rows.dtype == np.float32 and rows.shape == (200, count)
    assert hashlib.sha256(rows.astype("<f4").tobytes()).hexdigest()[:16] == digest
    assert uniforms("d-1", 3).tolist() == [[0.8698577880859375, 0.3725307881832123, 0.4803487956523895]]


def test_off_policy_estimates_match_statsmodels_and_cover_the_truth() -> None:
    rng = np.random.default_rng(9)
    n = 20000
    logged_p = rng.choice([0.2, 0.5, 0.3], size=n)
    target = rng.uniform(0, 1, size=n)
    rewards = rng.binomial(1, 0.3, size=n).astype(float)
    report = evaluate(rewards, logged_p, target)
    w = target / logged_p
    reference = DescrStatsW(w * rewards)
    assert report.ips.value == pytest.approx(reference.mean, rel=1e-12)
    lower, upper = reference.zconfint_mean(alpha=0.05)
    assert (report.ips.ci_lower, report.ips.ci_upper) == pytest.approx((lower, upper), rel=1e-9)
    weighted = DescrStatsW(rewards, weights=w)
    assert report.snips.value == pytest.approx(weighted.mean, rel=1e-12)
    # The delta-method interval agrees with a bootstrap of the ratio estimator.
    boot = stats.bootstrap((w * rewards, w), lambda a, b, axis=-1: a.sum(axis=axis) / b.sum(axis=axis),
                           paired=True, vectorized=True, n_resamples=2000, method="percentile",
                           random_state=np.random.default_rng(1))
    assert report.snips.ci_lower == pytest.approx(boot.confidence_interval.low, abs=0.003)
    assert report.snips.ci_upper == pytest.approx(boot.confidence_interval.high, abs=0.003)
    assert report.effective_sample_size == pytest.approx(w.sum() ** 2 / (w**2).sum())
    with pytest.raises(ValueError, match="propensities"):
        evaluate(rewards[:10], np.zeros(10), target[:10])


def test_ips_recovers_a_known_policy_value() -> None:
    """Simulated log: IPS/SNIPS intervals contain the target policy's true value."""
    x, arms, rewards = bandit_log(30000, seed=10)
    # Target: always arm 0 when recency > 0, else arm 2. True value from the simulator's means.
    target_arm = np.where(x[:, 0] > 0, 0, 2)
    truth = np.mean(np.where(target_arm == 0, np.clip(0.5 + 0.4 * x[:, 0], 0.01, 0.99), 0.55))
    report = evaluate(rewards, np.full(len(x), 1 / 3), (arms == target_arm).astype(float))
    assert report.ips.ci_lower < truth < report.ips.ci_upper
    assert report.snips.ci_lower < truth < report.snips.ci_upper
    assert gate(report, "better").publish  # better than the uniform logging policy's ~0.52
    assert not gate(evaluate(rewards, np.full(len(x), 1 / 3), (arms == 1).astype(float) * (x[:, 1] < 0)),
                    "not-worse").publish


def test_train_bandit_learns_and_gates(tmp_path: Path) -> None:
    x, arms, rewards = bandit_log(6000, seed=11)
    names = [ARMS[a] for a in arms]
    result = train_bandit(x, names, rewards, propensities=np.full(len(x), 1 / 3),
                          decision_ids=[f"d{i}" for i in range(len(x))], repository=tmp_path, name="b",
                          arm_names=ARMS, feature_names=CONTEXT, config=PolicyConfig(policy="linucb", alpha=0.1),
                          gate_rule="better")
    assert result.published is not None, result.reason
    assert (result.rows_train, result.rows_evaluated) == (4800, 1200)
    evaluation = read_manifest(result.published.path).evaluation
    assert evaluation["gate"] == "better" and evaluation["snips"]["ci_lower"] > evaluation["logged"]["value"]
    # The learned policy picks the truly best arm for clear-cut contexts.
    out = run(result.published.path.joinpath("model.onnx").read_bytes(),
              np.array([[2.0, -2.0, 0.0], [-2.0, 2.0, 0.0], [-2.0, -2.0, 0.0]]), ["a", "b", "c"], 1)
    assert out["probabilities"].argmax(axis=1).tolist() == [0, 1, 2]
    # A policy that cannot beat the logging policy is not published under "better".
    noise = np.random.default_rng(12).binomial(1, 0.5, size=len(x)).astype(float)
    refused = train_bandit(x, names, noise, propensities=np.full(len(x), 1 / 3), repository=tmp_path, name="b",
                           arm_names=ARMS, feature_names=CONTEXT, gate_rule="better")
    assert refused.published is None and "not confidently better" in refused.reason
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["1"]


def test_epsilon_greedy_over_an_xgboost_base_model(tmp_path: Path) -> None:
    from model_server.bandits import train_reward_model

    x, arms, rewards = bandit_log(6000, seed=13)
    config = PolicyConfig(policy="epsilon-greedy", epsilon=0.2, floor=0.02, base="xgboost")
    base, info = train_reward_model(x, arms, rewards, len(ARMS), params={"n_estimators": 30})
    assert info["base_kind"] == "xgboost-classifier" and info["base_parity_max_abs_diff"] <= 1e-5
    graph = build_policy_graph(None, config, base=base, n_arms=3, width=3)
    assert len(onnx.load_from_string(graph).graph.node) == 18 + len(onnx.load_from_string(base).graph.node)
    rows = np.random.default_rng(14).normal(size=(50, 3))
    out = run(graph, rows, [str(i) for i in range(50)], 1)
    # Scores are the base model's P(reward) for each (context, arm) pair, run on its own.
    base_session = session(base)
    for k in range(3):
        pairs = np.hstack([rows, np.tile(np.eye(3)[k], (50, 1))]).astype(np.float32)
        expected = base_session.run(["probabilities"], {"input": pairs})[0][:, 1]
        np.testing.assert_allclose(out["scores"][:, k], expected, atol=1e-6)
    greedy = out["scores"].argmax(axis=1)
    p = np.full((50, 3), 0.2 / 3)
    p[np.arange(50), greedy] += 0.8
    np.testing.assert_allclose(out["probabilities"], 0.94 * p + 0.02, atol=1e-6)
    # Through the training API, gated and published, then served like any other policy.
    result = train_bandit(x, arms, rewards, propensities=np.full(len(x), 1 / 3), repository=tmp_path, name="xg",
                          arm_names=ARMS, feature_names=CONTEXT, config=config, gate_rule="better")
    assert result.published is not None, result.reason
    manifest = read_manifest(result.published.path)
    assert manifest.kind == "bandit-epsilon-greedy" and manifest.training["base"] == "xgboost"
    with BackgroundLoop() as loop:
        repo = ModelRepository(tmp_path, poll_seconds=0)
        loop.run(repo.refresh())
        model = repo.get("xg")
        assert model.decide(np.array([[2.0, -2.0, 0.0]], dtype=np.float32), "d")[0].argmax() == 0
        assert model.decide(np.array([[-2.0, 2.0, 0.0]], dtype=np.float32), "d")[0].argmax() == 1
