"""Contextual-bandit policies as ONNX graphs: LinUCB, linear Thompson sampling, epsilon-greedy.

Each policy is a disjoint linear model per arm (ridge regression of reward on the context,
with an intercept), fitted in numpy and frozen into one ONNX graph:

    inputs   context  float32 [N, d]      the features, in the manifest's order
             random   float32 [N, R]      uniforms in (0, 1], derived from the decision id
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

The graphs are built for few nodes, because a policy answers one row at a time on cold caches
(the gRPC stack evicts them between two calls): there ONNX Runtime costs ~55-60 µs per run whatever
the graph, plus ~1-2 µs per node and more for each kind of kernel not run yet. Constants are
folded in float64 at build time (alpha^2 and Thompson's -2 scale^2 into the quadratic form,
epsilon into the floor's affine map), the intercept is a Gemm bias instead of a column of ones,
and the quadratic form is a sum of squares (see `_spread`). Node counts, new (before): LinUCB 18
(31), Thompson 28 (45), epsilon-greedy 13 (25), epsilon-greedy over a base model 18 (33) plus the
base model's; a LinUCB decision runs ~12 µs faster cold (~90 vs ~102 µs), ~3.5 µs hot (~11 vs
~14.5 µs). A published graph is the artifact: graphs built before keep being served unchanged.

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


class _Graph:
    """The nodes, initializers and opsets of a graph being built; every tensor is named by a string."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.opsets: dict[str, int] = {"": OPSET}
        self._consts: dict[str, np.ndarray] = {}

    def const(self, name: str, value: Any, dtype: Any = np.float32) -> str:
        """An initializer; asking again for the same name and value reuses it."""
        from onnx import numpy_helper

        array = np.asarray(value, dtype=dtype)
        known = self._consts.get(name)
        if known is not None:
            assert known.dtype == array.dtype and np.array_equal(known, array), f"two constants named {name!r}"
            return name
        self._consts[name] = array
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: Sequence[str], output: str | Sequence[str], **attrs: Any) -> str:
        """Append one node; returns the name of its (first) output."""
        from onnx import helper

        outputs = [output] if isinstance(output, str) else list(output)
        self.nodes.append(helper.make_node(op, list(inputs), outputs, **attrs))
        return outputs[0]


def build_policy_graph(stats: LinearArms | None, config: PolicyConfig, *, base: bytes | None = None,
                       n_arms: int | None = None, width: int | None = None) -> bytes:
    """The policy as a serialized ONNX model (see the module docstring for its signature and node budget).

    With `base` (a serialized ONNX predictor, e.g. an exported XGBoost classifier whose input
    is [context, one-hot arm]), epsilon-greedy scores each arm with that model inside the same
    graph instead of with the linear statistics: "epsilon-greedy over a base model".
    """
    import onnx
    from onnx import TensorProto, helper

    if base is None:
        assert stats is not None, "linear statistics or a base model are required"
        n_arms, dim = stats.theta.shape
        width = dim - 1
    else:
        if config.policy != "epsilon-greedy":
            raise ValueError("a base model is only supported for epsilon-greedy")
        if n_arms is None or width is None:
            raise ValueError("n_arms and width are required with a base model")
    config.validate(n_arms)
    g = _Graph()
    k_axis = g.const("axis1", [1], np.int64)
    keep = 1 - n_arms * config.floor
    if config.policy == "thompson":
        half = config.draws * n_arms
        u0, u1, u2 = "u0", "u1", "u2"
        g.node("Split", ["random", g.const("random_split", [1, half, half], np.int64)], [u0, u1, u2], axis=1)
    else:
        u0 = "random"  # one column: random[:, 0] is the input itself

    # Per-arm mean reward mu (or the base model's score), [N, K].
    mu_name = "mu" if config.policy == "linucb" else "scores"
    if base is None:
        assert stats is not None
        mu = g.node("Gemm", ["context", g.const("theta_x", stats.theta[:, :width].T),
                             g.const("theta_1", stats.theta[:, width])], mu_name)
    else:
        mu = _score_with_base(g, base, n_arms, width, mu_name)

    if config.policy == "linucb":
        bonus = g.node("Sqrt", [_spread(g, stats, config.alpha)], "bonus")     # alpha sqrt(z' A^-1 z)
        scores = g.node("Add", [mu, bonus], "scores")
        probabilities = _mix(g, _greedy(g, scores), n_arms, keep, config.floor)
    elif config.policy == "epsilon-greedy":
        # (1 - floor K) ((1 - eps) greedy + eps / K) + floor, as one affine map of the greedy distribution.
        probabilities = _mix(g, _greedy(g, mu), n_arms, keep * (1 - config.epsilon),
                             keep * config.epsilon / n_arms + config.floor)
    else:
        # Box-Muller with the posterior spread folded in: scale sd sqrt(-2 ln u1) = sqrt(ln u1 * (-2 scale^2 sd^2)),
        # one [N, M*K] row of draws per context (draw m of arm k at column m*K + k). A MatMul with M copies of
        # -2 I repeats the spread for every draw and applies the -2 exactly (a Tile would need a Mul too).
        m = config.draws
        repeat = g.const("repeat_neg2", np.tile(-2.0 * np.eye(n_arms), (1, m)))
        spread = g.node("MatMul", [_spread(g, stats, config.scale), repeat], "spread_m")
        radius = g.node("Sqrt", [g.node("Mul", [g.node("Log", [u1], "ln_u1"), spread], "radius_sq")], "radius")
        cos = g.node("Cos", [g.node("Mul", [u2, g.const("two_pi", 2 * np.pi)], "angle")], "cos")
        mu_m = g.node("Tile", [mu, g.const("draws_tile", [1, m], np.int64)], "mu_m")
        draws = g.node("Add", [g.node("Mul", [radius, cos], "noise"), mu_m], "draws_flat")
        draws = g.node("Reshape", [draws, g.const("nmk", [0, m, n_arms], np.int64)], "draws")
        top = g.node("ReduceMax", [draws], "draw_max", axes=[2], keepdims=1)
        wins = g.node("Cast", [g.node("Equal", [draws, top], "draw_eq")], "wins", to=TensorProto.FLOAT)
        share = g.node("ReduceSum", [wins, k_axis], "win_share", keepdims=0)                 # [N, K]
        p_policy = g.node("Div", [share, g.node("ReduceSum", [share, k_axis], "win_total", keepdims=1)],
                          "ts_policy")
        probabilities = _mix(g, p_policy, n_arms, keep, config.floor)

    _draw(g, probabilities, u0, n_arms)

    graph = helper.make_graph(
        g.nodes, f"twofold-{config.policy}",
        [helper.make_tensor_value_info("context", TensorProto.FLOAT, ["N", width]),
         helper.make_tensor_value_info("random", TensorProto.FLOAT, ["N", config.random_width(n_arms)])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", n_arms]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", n_arms]),
         helper.make_tensor_value_info("arm", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("propensity", TensorProto.FLOAT, ["N"])],
        g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in g.opsets.items()],
                              producer_name="twofold")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _draw(g: _Graph, probabilities: str, u0: str, n_arms: int) -> None:
    """The `arm` drawn from `probabilities` by inverse CDF with the uniform `u0`, and its `propensity`.

    arm = #{j < K-1 : P(arm <= j) < u0}. The CDF is a Gemm with an upper-triangular [K, K-1]
    matrix (CumSum and Min took two nodes): without the last column, float rounding can never pick
    arm K, so no clamp is needed, and a Gemm rather than a MatMul reuses a kernel the graph runs
    anyway (~1 µs less on cold caches). GatherND with batch_dims=1 reads probabilities[arm] as an
    [N] vector directly (GatherElements needed an Unsqueeze and a Squeeze around it).
    """
    from onnx import TensorProto

    upper = g.const("cdf_upper", np.triu(np.ones((n_arms, n_arms)))[:, :-1])
    cdf = g.node("Gemm", [probabilities, upper], "cdf")
    below = g.node("Cast", [g.node("Less", [cdf, u0], "below_b")], "below", to=TensorProto.INT64)
    arm = g.node("ReduceSum", [below, g.const("axis1", [1], np.int64)], "arm_n1", keepdims=1)       # [N, 1]
    g.node("Reshape", [arm, g.const("flat", [-1], np.int64)], "arm")
    g.node("GatherND", [probabilities, arm], "propensity", batch_dims=1)


def _spread(g: _Graph, stats: LinearArms | None, multiplier: float) -> str:
    """[N, K]: multiplier^2 * z' A_k^-1 z for z = [context, 1], in three nodes (the old form took seven).

    With A_k^-1 = F_k F_k' (from its eigendecomposition, so a semi-definite matrix works too),
    z' A_k^-1 z = |F_k' z|^2: one Gemm computes F_k' z for every arm (the intercept's row of F_k
    is the bias, so no column of ones is concatenated), and ReduceSumSquare sums each arm's
    block. A sum of squares is never negative, so the square root needs no clamp. Arms with equal
    statistics (an untrained policy) get bit-identical spreads, so they stay tied: ReduceSum over
    the same blocks, or a MatMul with a block-diagonal matrix, sum arms in different orders for
    some widths and break such ties by one rounding.
    """
    assert stats is not None
    n_arms, dim = stats.theta.shape
    eigval, eigvec = np.linalg.eigh((stats.a_inv + np.swapaxes(stats.a_inv, 1, 2)) / 2)
    factors = eigvec * (multiplier * np.sqrt(np.clip(eigval, 0, None)))[:, None, :]       # F_k, [K, D, D]
    flat = np.transpose(factors, (1, 0, 2)).reshape(dim, n_arms * dim)                    # [D, K*D]
    fz = g.node("Gemm", ["context", g.const("factor_x", flat[:-1]), g.const("factor_1", flat[-1])], "factor_z")
    blocks = g.node("Reshape", [fz, g.const("nkd", [0, n_arms, dim], np.int64)], "factor_z_arms")
    return g.node("ReduceSumSquare", [blocks], "spread", axes=[2], keepdims=0)


def _greedy(g: _Graph, scores: str) -> str:
    """Probability 1/T for each of the T arms tied for the best score, 0 for the others.

    Softmax over 0 at the ties and -inf elsewhere would be one node fewer, but measured slower
    (+3.5 µs cold, +0.6 µs hot for LinUCB): its kernel is one more to fetch into a cold cache,
    whereas Cast and ReduceSum run anyway for the arm draw.
    """
    from onnx import TensorProto

    top = g.node("ReduceMax", [scores], "best", axes=[1], keepdims=1)
    hit = g.node("Cast", [g.node("Equal", [scores, top], "is_best")], "hit", to=TensorProto.FLOAT)
    return g.node("Div", [hit, g.node("ReduceSum", [hit, g.const("axis1", [1], np.int64)], "n_best", keepdims=1)],
                  "greedy")


def _mix(g: _Graph, policy: str, n_arms: int, share: float, offset: float) -> str:
    """`probabilities` = share * policy + offset: the exploration floor (and epsilon-greedy's epsilon).

    One Gemm with a diagonal matrix instead of a Mul and an Add; the constants are folded in float64.
    """
    return g.node("Gemm", [policy, g.const("mix_share", share * np.eye(n_arms)),
                           g.const("mix_offset", np.full(n_arms, offset))], "probabilities")


def _score_with_base(g: _Graph, base: bytes, n_arms: int, width: int, output: str) -> str:
    """Inline `base` into the policy graph: score every (context, arm) pair into `output`, [N, K].

    Each context row is padded with K zero columns and added to the K rows of [0 | I_K] (a
    broadcast, so N need not be known), giving every context joined with each arm's one-hot
    indicator; the base model scores the N*K rows in one call, and its last output column (the
    positive class probability, or the regression value) becomes the arm's score.
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
            g.opsets[opset.domain] = max(g.opsets.get(opset.domain, 0), opset.version)
    model = compose.add_prefix(model, "base_")
    base_input = model.graph.input[0].name
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if dims and dims[-1].HasField("dim_value") and dims[-1].dim_value != width + n_arms:
        raise ValueError(f"the base model takes {dims[-1].dim_value} columns; expected {width} context features "
                         f"+ {n_arms} arm indicators = {width + n_arms}")
    outputs = {o.name: o for o in model.graph.output}
    score_name = "base_probabilities" if "base_probabilities" in outputs else model.graph.output[-1].name
    padded = g.node("Pad", ["context", g.const("arm_pads", [0, 0, 0, n_arms], np.int64)], "ctx_padded")
    rows = g.node("Unsqueeze", [padded, g.const("ax1", [1], np.int64)], "ctx_rows")            # [N, 1, d+K]
    indicators = np.hstack([np.zeros((n_arms, width)), np.eye(n_arms)])                     # [K, d+K]
    joined = g.node("Add", [rows, g.const("arm_indicators", indicators)], "joined")          # [N, K, d+K]
    g.node("Reshape", [joined, g.const("flat_shape", [-1, width + n_arms], np.int64)], base_input)
    g.nodes.extend(model.graph.node)
    g.inits.extend(model.graph.initializer)
    last = g.node("Slice", [score_name, g.const("last_s", [-1], np.int64), g.const("last_e", [2**62], np.int64),
                            g.const("last_ax", [1], np.int64)], "base_last")
    return g.node("Reshape", [last, g.const("nk_shape", [-1, n_arms], np.int64)], output)


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
