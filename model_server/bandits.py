"""Contextual-bandit policies as ONNX graphs: LinUCB, linear Thompson sampling, epsilon-greedy.

Each policy is a disjoint linear model per arm (ridge regression of reward on the context,
with an intercept), fitted in numpy and frozen into one ONNX graph:

    inputs   context  float32 [N, d]      the features, in the manifest's order
             random   float32 [N, R]      uniforms in (0, 1), derived from the decision id
    outputs  scores        float32 [N, K]  per-arm score (UCB for LinUCB, mean otherwise)
             probabilities float32 [N, K]  the policy's distribution over arms
             arm           int64   [N]     the arm drawn from `probabilities` with random[:, 0]
             propensity    float32 [N]     probabilities[arm]

The policy's own distribution is mixed with an exploration floor, p = (1 - K*floor) * p + floor,
so every arm keeps a propensity of at least `floor` (> 0): logged decisions then support
unbiased off-policy evaluation of any other policy. The arm is sampled from exactly the
distribution whose value is logged as the propensity. For Thompson sampling the distribution
is the share of M posterior draws that each arm wins (the draws use random[:, 1:]), so its
propensity is exact for the policy as served rather than an unknown integral. Ties (e.g. an
untrained policy) share probability equally.

`onnx` is imported lazily: it belongs to the `train` extra.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model_server.manifest import Manifest, TensorSpec
from model_server.publish import Published, publish

POLICIES = {"linucb": "bandit-linucb", "thompson": "bandit-thompson", "epsilon-greedy": "bandit-epsilon-greedy"}
OPSET = 17


@dataclass(frozen=True)
class LinearArms:
    """Ridge statistics per arm over the context plus an intercept (dimension d + 1)."""

    theta: np.ndarray      # [K, d+1] posterior means
    a_inv: np.ndarray      # [K, d+1, d+1] inverse of (lambda I + X'X)
    counts: np.ndarray     # [K] rows seen per arm


def fit_linear_arms(x: np.ndarray, arms: np.ndarray, rewards: np.ndarray, n_arms: int,
                    ridge: float = 1.0, weights: np.ndarray | None = None) -> LinearArms:
    """Per-arm ridge regression of reward on [context, 1]; `weights` optionally weight rows."""
    x = np.asarray(x, dtype=np.float64)
    arms = np.asarray(arms, dtype=np.int64)
    rewards = np.asarray(rewards, dtype=np.float64)
    if x.ndim != 2 or len(x) != len(arms) or len(x) != len(rewards):
        raise ValueError("x, arms and rewards must have one row each")
    if len(arms) and (arms.min() < 0 or arms.max() >= n_arms):
        raise ValueError(f"arm indices must be within 0..{n_arms - 1}")
    if not np.isfinite(x).all() or not np.isfinite(rewards).all():
        raise ValueError("contexts and rewards must be finite")
    if ridge <= 0:
        raise ValueError("ridge must be > 0")
    w = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=np.float64)
    z = np.hstack([x, np.ones((len(x), 1))])
    dim = z.shape[1]
    theta = np.zeros((n_arms, dim))
    a_inv = np.zeros((n_arms, dim, dim))
    counts = np.zeros(n_arms, dtype=np.int64)
    for k in range(n_arms):
        mask = arms == k
        zk, rk, wk = z[mask], rewards[mask], w[mask]
        a = ridge * np.eye(dim) + (zk * wk[:, None]).T @ zk
        b = (zk * wk[:, None]).T @ rk
        a_inv[k] = np.linalg.inv(a)
        theta[k] = a_inv[k] @ b
        counts[k] = int(mask.sum())
    return LinearArms(theta, a_inv, counts)


def untrained_arms(width: int, n_arms: int, ridge: float = 1.0) -> LinearArms:
    """A policy before any data: equal scores everywhere, so it explores uniformly."""
    dim = width + 1
    return LinearArms(np.zeros((n_arms, dim)), np.tile(np.eye(dim) / ridge, (n_arms, 1, 1)),
                      np.zeros(n_arms, dtype=np.int64))


@dataclass(frozen=True)
class PolicyConfig:
    """Which policy and its knobs. `floor` is the minimum propensity of every arm."""

    policy: str = "linucb"
    alpha: float = 1.0          # LinUCB: width of the confidence bonus
    epsilon: float = 0.1        # epsilon-greedy: share of uniform exploration
    scale: float = 1.0          # Thompson: posterior standard-deviation multiplier
    draws: int = 64             # Thompson: posterior draws per decision (M)
    floor: float = 0.01
    ridge: float = 1.0
    # epsilon-greedy only: "linear" (ridge per arm) or "xgboost" (a reward model over [context, arm]).
    base: str = "linear"
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self, n_arms: int) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {self.policy!r}")
        if not 0 < self.floor <= 1.0 / n_arms:
            raise ValueError(f"floor must be within (0, 1/K] = (0, {1.0 / n_arms:.4g}]; got {self.floor}")
        if not 0 <= self.epsilon <= 1:
            raise ValueError("epsilon must be within [0, 1]")
        if self.base not in ("linear", "xgboost") or (self.base == "xgboost" and self.policy != "epsilon-greedy"):
            raise ValueError("base must be linear, or xgboost for epsilon-greedy")
        if self.alpha < 0 or self.scale < 0 or self.draws < 1:
            raise ValueError("alpha and scale must be >= 0 and draws >= 1")

    def random_width(self, n_arms: int) -> int:
        return 1 + (2 * self.draws * n_arms if self.policy == "thompson" else 0)


def build_policy_graph(stats: LinearArms | None, config: PolicyConfig, *, base: bytes | None = None,
                       n_arms: int | None = None, width: int | None = None) -> bytes:
    """The policy as a serialized ONNX model (see the module docstring for its signature).

    With `base` (a serialized ONNX predictor, e.g. an exported XGBoost classifier whose input
    is [context, one-hot arm]), epsilon-greedy scores each arm with that model inside the same
    graph instead of with the linear statistics: "epsilon-greedy over a base model".
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if base is None:
        assert stats is not None, "linear statistics or a base model are required"
        n_arms, dim = stats.theta.shape
        width = dim - 1
    else:
        if config.policy != "epsilon-greedy":
            raise ValueError("a base model is only supported for epsilon-greedy")
        if n_arms is None or width is None:
            raise ValueError("n_arms and width are required with a base model")
        dim = width + 1
    config.validate(n_arms)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    opsets = {"": OPSET}

    def const(name: str, value: Any, dtype: Any = np.float32) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(op: str, inputs: Sequence[str], output: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, list(inputs), [output], **attrs))
        return output

    # z = [context, 1]
    shape = node("Shape", ["context"], "ctx_shape")
    rows = node("Slice", [shape, const("i0", [0], np.int64), const("i1", [1], np.int64)], "rows")
    ones_shape = node("Concat", [rows, const("one_i", [1], np.int64)], "ones_shape", axis=0)
    ones = node("ConstantOfShape", [ones_shape], "ones",
                value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]))
    z = node("Concat", ["context", ones], "z", axis=1)
    k_axis = const("axis1", [1], np.int64)
    if base is None:
        assert stats is not None
        mu = node("MatMul", [z, const("theta_t", stats.theta.T)], "mu")                  # [N, K]
    else:
        mu = _score_with_base(base, n_arms, width, rows, node, const, nodes, inits, opsets)

    def greedy(scores: str, tag: str) -> str:
        top = node("ReduceMax", [scores], f"{tag}_max", axes=[1], keepdims=1)
        hit = node("Cast", [node("Equal", [scores, top], f"{tag}_eq")], f"{tag}_hit", to=TensorProto.FLOAT)
        return node("Div", [hit, node("ReduceSum", [hit, k_axis], f"{tag}_n", keepdims=1)], f"{tag}_p")

    if config.policy in ("linucb", "thompson"):
        # x' A_k^-1 x for every arm k at once: [N, D] @ [D, K*D] -> [N, K, D], times z, summed over D.
        flat = np.transpose(stats.a_inv, (1, 0, 2)).reshape(dim, n_arms * dim)
        za = node("MatMul", [z, const("a_inv_flat", flat)], "za")
        za3 = node("Reshape", [za, const("nkd", [0, n_arms, dim], np.int64)], "za3")
        zz = node("Unsqueeze", [z, k_axis], "z3")
        quad = node("ReduceSum", [node("Mul", [za3, zz], "za_z"), const("axis2", [2], np.int64)], "quad",
                    keepdims=0)
        sd = node("Sqrt", [node("Max", [quad, const("zero", 0.0)], "quad_pos")], "sd")
    if config.policy == "linucb":
        scores = node("Add", [mu, node("Mul", [sd, const("alpha", config.alpha)], "bonus")], "scores")
        p_policy = greedy(scores, "ucb")
    elif config.policy == "epsilon-greedy":
        scores = node("Identity", [mu], "scores")
        p_greedy = greedy(scores, "eg")
        p_policy = node("Add", [node("Mul", [p_greedy, const("one_minus_eps", 1 - config.epsilon)], "eg_scaled"),
                                const("eps_share", config.epsilon / n_arms)], "eg_policy")
    else:
        m = config.draws
        scores = node("Identity", [mu], "scores")
        half = m * n_arms
        u1 = node("Slice", ["random", const("s1", [1], np.int64), const("e1", [1 + half], np.int64), k_axis], "u1")
        u2 = node("Slice", ["random", const("s2", [1 + half], np.int64), const("e2", [1 + 2 * half], np.int64),
                            k_axis], "u2")
        # Box-Muller: z = sqrt(-2 ln u1) cos(2 pi u2), reshaped to [N, M, K].
        radius = node("Sqrt", [node("Mul", [node("Log", [u1], "ln_u1"), const("m2", -2.0)], "r2")], "radius")
        angle = node("Cos", [node("Mul", [u2, const("two_pi", 2 * np.pi)], "theta_angle")], "cos")
        normal = node("Reshape", [node("Mul", [radius, angle], "normal_flat"),
                                  const("nmk", [0, m, n_arms], np.int64)], "normal")
        spread = node("Unsqueeze", [node("Mul", [sd, const("scale", config.scale)], "sd_scaled"), k_axis],
                      "spread")
        draws = node("Add", [node("Unsqueeze", [mu, k_axis], "mu3"), node("Mul", [normal, spread], "noise")],
                     "draws")
        top = node("ReduceMax", [draws], "draw_max", axes=[2], keepdims=1)
        wins = node("Cast", [node("Equal", [draws, top], "draw_eq")], "wins", to=TensorProto.FLOAT)
        share = node("ReduceSum", [wins, k_axis], "win_share", keepdims=0)                 # [N, K]
        p_policy = node("Div", [share, node("ReduceSum", [share, k_axis], "win_total", keepdims=1)], "ts_policy")
    probabilities = node("Add", [node("Mul", [p_policy, const("keep", 1 - n_arms * config.floor)], "kept"),
                                 const("floor", config.floor)], "probabilities")
    # Inverse-CDF draw with random[:, 0]; clipped so float rounding can never pick arm K.
    u0 = node("Slice", ["random", const("s0", [0], np.int64), const("e0", [1], np.int64), k_axis], "u0")
    cdf = node("CumSum", [probabilities, const("cum_axis", 1, np.int64)], "cdf")
    below = node("Cast", [node("Less", [cdf, u0], "below_b")], "below", to=TensorProto.INT64)
    raw_arm = node("ReduceSum", [below, k_axis], "raw_arm", keepdims=0)
    arm = node("Min", [raw_arm, const("last_arm", n_arms - 1, np.int64)], "arm")
    picked = node("GatherElements", [probabilities, node("Unsqueeze", [arm, k_axis], "arm2")], "picked", axis=1)
    node("Squeeze", [picked, k_axis], "propensity")

    graph = helper.make_graph(
        nodes, f"twofold-{config.policy}",
        [helper.make_tensor_value_info("context", TensorProto.FLOAT, ["N", width]),
         helper.make_tensor_value_info("random", TensorProto.FLOAT, ["N", config.random_width(n_arms)])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", n_arms]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", n_arms]),
         helper.make_tensor_value_info("arm", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("propensity", TensorProto.FLOAT, ["N"])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              producer_name="twofold")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _score_with_base(base: bytes, n_arms: int, width: int, rows: str, node: Any, const: Any,
                     nodes: list[Any], inits: list[Any], opsets: dict[str, int]) -> str:
    """Inline `base` into the policy graph: score every (context, arm) pair, return [N, K] scores.

    Each context row is repeated once per arm and joined with that arm's one-hot indicator,
    the base model scores the N*K rows in one call, and its last output column (the positive
    class probability, or the regression value) becomes the arm's score.
    """
    import onnx
    from onnx import compose

    model = onnx.load_from_string(base)
    if len(model.graph.input) != 1:
        raise ValueError("the base model must have exactly one input")
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > OPSET:
            raise ValueError(f"the base model uses opset {opset.version}; at most {OPSET} is supported")
        if opset.domain not in ("", "ai.onnx"):
            opsets[opset.domain] = max(opsets.get(opset.domain, 0), opset.version)
    model = compose.add_prefix(model, "base_")
    base_input = model.graph.input[0].name
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if dims and dims[-1].HasField("dim_value") and dims[-1].dim_value != width + n_arms:
        raise ValueError(f"the base model takes {dims[-1].dim_value} columns; expected {width} context features "
                         f"+ {n_arms} arm indicators = {width + n_arms}")
    outputs = {o.name: o for o in model.graph.output}
    score_name = "base_probabilities" if "base_probabilities" in outputs else model.graph.output[-1].name
    k = const("k_dim", [n_arms], np.int64)
    d = const("d_dim", [width], np.int64)
    ctx3 = node("Unsqueeze", ["context", const("ax1", [1], np.int64)], "ctx3")
    ctx_k = node("Expand", [ctx3, node("Concat", [rows, k, d], "nkd", axis=0)], "ctx_k")
    eye = const("arm_eye", np.eye(n_arms, dtype=np.float32)[None, :, :])
    eye_n = node("Expand", [eye, node("Concat", [rows, k, k], "nkk", axis=0)], "eye_n")
    joined = node("Concat", [ctx_k, eye_n], "joined", axis=2)
    node("Reshape", [joined, const("flat_shape", [-1, width + n_arms], np.int64)], base_input)
    nodes.extend(model.graph.node)
    inits.extend(model.graph.initializer)
    last = node("Slice", [score_name, const("last_s", [-1], np.int64), const("last_e", [2**62], np.int64),
                          const("last_ax", [1], np.int64)], "base_last")
    return node("Reshape", [last, const("nk_shape", [-1, n_arms], np.int64)], "mu")


def train_reward_model(x: np.ndarray, arms: np.ndarray, rewards: np.ndarray, n_arms: int,
                       params: dict[str, Any] | None = None, seed: int = 0) -> tuple[bytes, dict[str, Any]]:
    """An XGBoost model of reward given [context, one-hot arm], exported to ONNX with a parity check.

    Binary rewards train a classifier (the score is P(reward)); other rewards a regressor.
    """
    import xgboost as xgb

    from model_server.export_xgboost import _convert, _wrap, check_parity

    x = np.asarray(x, dtype=np.float32)
    features = np.hstack([x, np.eye(n_arms, dtype=np.float32)[np.asarray(arms, dtype=np.int64)]])
    rewards = np.asarray(rewards, dtype=np.float64)
    binary = bool(np.isin(rewards, (0.0, 1.0)).all())
    settings = {"n_estimators": 100, "max_depth": 4, "learning_rate": 0.1, "random_state": seed, **(params or {})}
    if binary and len(np.unique(rewards)) == 2:
        model: Any = xgb.XGBClassifier(**settings).fit(features, rewards.astype(int))
    else:
        model = xgb.XGBRegressor(**settings).fit(features, rewards)
    wrapped, kind = _wrap(model.get_booster())
    graph = _convert(wrapped, features.shape[1])
    parity = check_parity(graph, wrapped, kind, features[: min(len(features), 1000)])
    if not parity.passed:
        raise ValueError(f"the reward model's ONNX export differs from XGBoost by {parity.max_abs_diff:.3g}")
    return graph, {"base": "xgboost", "base_kind": kind, "base_params": settings,
                   "base_parity_max_abs_diff": parity.max_abs_diff}


def policy_manifest(name: str, arms: Sequence[str], feature_names: Sequence[str], config: PolicyConfig,
                    training: dict[str, Any], evaluation: dict[str, Any] | None = None) -> Manifest:
    n_arms, width = len(arms), len(feature_names)
    return Manifest(
        name=name, kind=POLICIES[config.policy], feature_names=tuple(feature_names),
        inputs=(TensorSpec("context", "FP32", (-1, width)),
                TensorSpec("random", "FP32", (-1, config.random_width(n_arms)))),
        outputs=(TensorSpec("scores", "FP32", (-1, n_arms)), TensorSpec("probabilities", "FP32", (-1, n_arms)),
                 TensorSpec("arm", "INT64", (-1,)), TensorSpec("propensity", "FP32", (-1,))),
        score_output="scores", output_names=tuple(arms), allow_nan=False, arms=tuple(arms),
        random_width=config.random_width(n_arms), training=training, evaluation=evaluation or {})


def policy_training_info(config: PolicyConfig, counts: np.ndarray) -> dict[str, Any]:
    return {"policy": config.policy, "alpha": config.alpha, "epsilon": config.epsilon, "scale": config.scale,
            "draws": config.draws, "floor": config.floor, "ridge": config.ridge, "base": config.base,
            "rows_per_arm": np.asarray(counts).tolist(), **config.extra}


def fit_policy(x: np.ndarray, arms: np.ndarray, rewards: np.ndarray, n_arms: int,
               config: PolicyConfig) -> tuple[bytes, dict[str, Any]]:
    """Fit the configured policy on logged rows; return its graph and training metadata."""
    counts = np.bincount(np.asarray(arms, dtype=np.int64), minlength=n_arms)
    if config.base == "xgboost":
        base, info = train_reward_model(x, arms, rewards, n_arms)
        graph = build_policy_graph(None, config, base=base, n_arms=n_arms, width=np.asarray(x).shape[1])
        return graph, {**policy_training_info(config, counts), **info}
    stats = fit_linear_arms(x, arms, rewards, n_arms, config.ridge)
    return build_policy_graph(stats, config), policy_training_info(config, counts)


def publish_policy_graph(*, repository: str | os.PathLike[str], name: str, arms: Sequence[str],
                         feature_names: Sequence[str], graph: bytes, config: PolicyConfig,
                         training: dict[str, Any], evaluation: dict[str, Any] | None = None) -> Published:
    """Publish an already built policy graph as the next version of `name`."""
    manifest = policy_manifest(name, arms, feature_names, config, training, evaluation)
    return publish(repository, manifest, graph)


def publish_policy(*, repository: str | os.PathLike[str], name: str, arms: Sequence[str],
                   feature_names: Sequence[str], stats: LinearArms, config: PolicyConfig,
                   evaluation: dict[str, Any] | None = None) -> Published:
    """Build the graph for `stats` and publish it as the next version of `name`."""
    if stats.theta.shape != (len(arms), len(feature_names) + 1):
        raise ValueError(f"statistics for {stats.theta.shape[0]} arms x {stats.theta.shape[1] - 1} features "
                         f"do not match {len(arms)} arms x {len(feature_names)} feature names")
    return publish_policy_graph(repository=repository, name=name, arms=arms, feature_names=feature_names,
                                graph=build_policy_graph(stats, config), config=config,
                                training=policy_training_info(config, stats.counts), evaluation=evaluation)
