"""One loaded model version: an ONNX Runtime session tuned for single-row latency, plus the
request validation and output shaping every API (Predict, Score, Decide, ModelInfer) shares.

Tuning (measured in DESIGN.md): one intra-op and one inter-op thread, sequential execution
and no spinning. A single row costs ~5 µs this way; thread pools and spin-waiting only add
latency and steal the CPU the gRPC stack needs. Sessions are created and warmed up off the
event loop by the repository, then swapped in by reference.

Batches of `BATCH_ROWS` rows or more (Score's candidate lists) go to a second session with
`batch_threads` intra-op threads when the server is given more than one: for 100 candidates of
a 100-tree model, two threads cut ONNX Runtime's wall time by ~20 % (292 -> 233 µs on cold
caches here) for ~15 % more CPU; below ~64 rows the thread hand-off eats the gain.

Between two calls the gRPC stack evicts the CPU caches, so the per-call Python here is tuned
for cold caches, where each numpy call costs several µs against well under 1 µs hot: one
`RunOptions` shared by every run, a single `np.ndarray` view of the request's bytes, and a
pure-Python finiteness check for small inputs (see `all_finite`). Measured on one 20-feature
row against the previous code in the same process (median µs, caches trashed before each call):
`dense` 48 -> 32 cold (2.0 -> 1.1 hot), `decide` 127 -> 116 (14.2 -> 13.0), `predict` of a
100-tree model 83 -> 77 (6.2 -> 5.5).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from model_server.errors import invalid
from model_server.manifest import MODEL_FILE, Manifest, ManifestError
from model_server.metrics import VersionMetrics
from model_server.randomness import uniforms, uniforms_for

POLICY_OUTPUTS = ("scores", "probabilities", "arm", "propensity")
_ORT_TO_OIP = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(int64)": "INT64",
               "tensor(int32)": "INT32", "tensor(bool)": "BOOL", "tensor(string)": "BYTES"}


BATCH_ROWS = 64
# Passed to every run: with None, the binding builds a default RunOptions per call (~6 µs cold, ~0.6 µs hot).
# Runs only read it, so one object serves every session and thread.
_RUN_OPTIONS = ort.RunOptions()
_DECIDE_OUTPUTS = ["scores", "arm", "propensity"]
_FLOAT32_LE = np.dtype("<f4")
_FLOAT32 = np.dtype(np.float32)
# Up to this many float32 values, summing them in Python is cheaper than numpy: on cold caches
# 12 vs 24 µs for 20 values (the break-even is ~600), hot 0.4 vs 0.9 µs (break-even ~64).
PYTHON_CHECK_MAX = 64


def session_options(intra_op_threads: int = 1) -> ort.SessionOptions:
    """Options for lowest single-row latency on a shared CPU (see the module docstring)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def rows_from_bytes(data: bytes, rows: int, cols: int, what: str) -> np.ndarray:
    """View `rows x cols` little-endian float32 values; INVALID_ARGUMENT when sizes disagree."""
    if rows < 1 or cols < 1:
        raise invalid(f"{what}: rows and cols must both be at least 1 (got {rows} x {cols})", "wrong_shape")
    expected = rows * cols * 4
    if len(data) != expected:
        raise invalid(f"{what}: rows x cols = {rows} x {cols} needs {expected} bytes of little-endian float32, "
                      f"got {len(data)} bytes", "wrong_shape")
    return np.ndarray((rows, cols), _FLOAT32_LE, data)  # one call: ~6 µs less cold than frombuffer + reshape


def all_finite(x: np.ndarray) -> bool:
    """Whether no value of `x` is NaN or infinite.

    Small float32 inputs (one request row) are summed in Python floats: a NaN or an infinity makes
    the sum non-finite, and a double cannot overflow summing fewer than 1e270 finite float32 values
    (each below 3.4e38), so the sum is finite exactly when every value is. Larger inputs go through
    numpy (see PYTHON_CHECK_MAX), and so do other dtypes, whose finite values could overflow.
    """
    if x.dtype is _FLOAT32 and x.size <= PYTHON_CHECK_MAX:  # `is`: ~2.5 µs less cold than ==
        return math.isfinite(sum(x.ravel().tolist()))
    return bool(np.isfinite(x).all())


class LoadedModel:
    """A version ready to serve. Immutable once built; dropped when no call references it."""

    def __init__(self, manifest: Manifest, version: str, path: Path, batch_threads: int = 1) -> None:
        self.manifest = manifest
        self.name = manifest.name
        self.version = version
        self.path = path
        try:
            self.session = ort.InferenceSession(str(path / MODEL_FILE), session_options(),
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for every kind of broken file.
            raise ManifestError(f"ONNX Runtime cannot load {path / MODEL_FILE}: {exc}") from exc
        self._check_graph()
        # Policies answer one row at a time (Decide); only scoring models get a batch session.
        self.batch_session = self.session
        if batch_threads > 1 and not manifest.is_policy:
            self.batch_session = ort.InferenceSession(str(path / MODEL_FILE), session_options(batch_threads),
                                                      providers=["CPUExecutionProvider"])
        self.width = len(manifest.feature_names)
        self.feature_index = {n: i for i, n in enumerate(manifest.feature_names)}
        self.input_name = manifest.input_name
        self.is_policy = manifest.is_policy
        self.arms = manifest.arms
        score_spec = next(o for o in manifest.outputs if o.name == manifest.score_output)
        self._score_2d = len(score_spec.shape) == 2
        self._score_output = [manifest.score_output]
        self._single_column = len(manifest.output_names) == 1 and self._score_2d
        self.loaded_at = time.time()
        self.metrics = VersionMetrics(self.name, version, manifest.arms)
        self.warm_up()

    # -- loading ---------------------------------------------------------------------------------
    def _check_graph(self) -> None:
        """Refuse a model whose graph does not match its manifest (names, feature count)."""
        graph_inputs = {i.name: i for i in self.session.get_inputs()}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        for spec in self.manifest.inputs:
            found = graph_inputs.get(spec.name)
            if found is None:
                raise ManifestError(f"manifest input {spec.name!r} is not an input of the graph "
                                    f"({', '.join(graph_inputs)})")
            if _ORT_TO_OIP.get(found.type) != spec.datatype:
                raise ManifestError(f"input {spec.name!r} is {found.type} in the graph, "
                                    f"{spec.datatype} in the manifest")
            last = found.shape[-1] if found.shape else None
            if isinstance(last, int) and last != spec.shape[-1]:
                raise ManifestError(f"input {spec.name!r} has {last} columns in the graph, "
                                    f"{spec.shape[-1]} in the manifest")
        missing = {o.name for o in self.manifest.outputs} - graph_outputs
        if missing:
            raise ManifestError(f"manifest outputs {sorted(missing)} are not outputs of the graph")
        if self.manifest.is_policy and not set(POLICY_OUTPUTS) <= graph_outputs:
            raise ManifestError(f"a policy graph must output {', '.join(POLICY_OUTPUTS)}")

    def warm_up(self) -> None:
        """Run the graph once so the first real call does not pay for lazy initialisation."""
        row = np.zeros((1, self.width), dtype=np.float32)
        if self.is_policy:
            self.decide(row, "warm-up")
        else:
            self.predict(row)
            if self.batch_session is not self.session:
                self.score(np.zeros((BATCH_ROWS, self.width), dtype=np.float32))

    # -- inputs ----------------------------------------------------------------------------------
    def dense(self, data: bytes, rows: int, cols: int, what: str = "dense") -> np.ndarray:
        """Validate raw little-endian float32 rows and view them as a `(rows, cols)` array."""
        x = rows_from_bytes(data, rows, cols, what)
        self.check_input(x, what)
        return x

    def check_input(self, x: np.ndarray, what: str) -> None:
        """The feature count must match the manifest, and values must be legal for the model."""
        if x.shape[1] != self.width:
            names = self.manifest.feature_names
            raise invalid(f"{what}: model {self.name!r} version {self.version} takes {self.width} features "
                          f"({', '.join(names[:8])}{', ...' if self.width > 8 else ''}), got {x.shape[1]} columns",
                          "wrong_shape")
        self.check_values(x, what)

    def named(self, values: Mapping[str, float]) -> np.ndarray:
        """One row from named features, in the manifest's order; every feature is required."""
        if len(values) != self.width or not all(k in self.feature_index for k in values):
            unknown = sorted(k for k in values if k not in self.feature_index)
            missing = [n for n in self.manifest.feature_names if n not in values]
            parts = []
            if unknown:
                parts.append(f"unknown feature(s) {unknown}")
            if missing:
                parts.append(f"missing feature(s) {missing}")
            raise invalid(f"model {self.name!r} version {self.version}: {'; '.join(parts)}",
                          "unknown_feature" if unknown else "missing_feature")
        x = np.array([[values[n] for n in self.manifest.feature_names]], dtype=np.float32)
        self.check_values(x, "named")
        return x

    def check_values(self, x: np.ndarray, what: str) -> None:
        """Refuse NaN or infinity where the model has no notion of a missing value."""
        if not self.manifest.allow_nan and not all_finite(x):
            bad = np.argwhere(~np.isfinite(x))[0]
            raise invalid(f"{what}: feature {self.manifest.feature_names[bad[-1]]!r} (row {bad[0]}) is "
                          f"{x[tuple(bad)]}; model {self.name!r} does not accept NaN or infinite values", "nan")

    # -- running ---------------------------------------------------------------------------------
    def predict(self, x: np.ndarray) -> np.ndarray:
        """The score output as a `(rows, cols)` float32 array (binary classifiers: P(class 1))."""
        session = self.batch_session if x.shape[0] >= BATCH_ROWS else self.session
        out = session.run(self._score_output, {self.input_name: x} if not self.is_policy
                          else self._policy_feeds(x, None), _RUN_OPTIONS)[0]
        if not self._score_2d:
            return out.reshape(-1, 1).astype(np.float32, copy=False)
        if self._single_column:
            col = self.manifest.score_column % out.shape[1]
            return out[:, col:col + 1]
        return out

    def score(self, x: np.ndarray) -> np.ndarray:
        """One float32 score per row: the manifest's score column."""
        session = self.batch_session if x.shape[0] >= BATCH_ROWS else self.session
        out = session.run(self._score_output, {self.input_name: x}, _RUN_OPTIONS)[0]
        if not self._score_2d:
            return out.reshape(-1)
        return out[:, self.manifest.score_column]

    def _policy_feeds(self, x: np.ndarray, decision_id: str | None) -> dict[str, np.ndarray]:
        if decision_id is None:
            random = np.full((x.shape[0], self.manifest.random_width), 0.5, dtype=np.float32)
        else:
            random = uniforms(decision_id, self.manifest.random_width)
        return {self.input_name: x, "random": random}

    def decide(self, x: np.ndarray, decision_id: str) -> tuple[np.ndarray, int, float]:
        """Per-arm scores, the chosen arm's index and its propensity, for one context row."""
        scores, arm, propensity = self.session.run(_DECIDE_OUTPUTS, self._policy_feeds(x, decision_id), _RUN_OPTIONS)
        return scores[0], arm.item(), propensity.item()

    def decide_rows(self, x: np.ndarray, decision_ids: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`decide` for several context rows at once: scores `(rows, arms)`, arms and propensities `(rows,)`.

        Below BATCH_ROWS rows each row's outputs are exactly those `decide` gives it alone.
        """
        feeds = {self.input_name: x, "random": uniforms_for(decision_ids, self.manifest.random_width)}
        scores, arm, propensity = self.session.run(_DECIDE_OUTPUTS, feeds, _RUN_OPTIONS)
        return scores, arm.reshape(-1), propensity.reshape(-1)

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None) -> list[np.ndarray]:
        """Run the raw graph (Open Inference Protocol)."""
        return self.session.run(outputs, feeds, _RUN_OPTIONS)

    def io_metadata(self) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
        """Graph inputs and outputs as (name, OIP datatype, shape with -1 for dynamic)."""
        def describe(items: list) -> list[tuple[str, str, list[int]]]:
            return [(i.name, _ORT_TO_OIP.get(i.type, i.type),
                     [d if isinstance(d, int) else -1 for d in (i.shape or [])]) for i in items]
        return describe(self.session.get_inputs()), describe(self.session.get_outputs())

    def input_types(self) -> dict[str, str]:
        return {i.name: _ORT_TO_OIP.get(i.type, i.type) for i in self.session.get_inputs()}
