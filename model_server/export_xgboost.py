"""Training XGBoost models and exporting them to ONNX with a parity check.

XGBoost and onnxmltools are imported inside the functions: they belong to the `train` extra,
and a serving install must not need them.

Facts this module relies on (DESIGN.md): `onnxmltools.convert_xgboost` matches XGBoost 3.x to
~1e-6 when the booster's feature names are `f0..fN` (our names are kept in the manifest instead),
and a `reg:logistic` regressor converts wrongly, so probabilities come from a classifier
(`binary:logistic`). Every export is checked against XGBoost on held-out rows and refused when
any output differs by more than `tolerance`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model_server.manifest import Manifest, TensorSpec
from model_server.publish import Published, publish

PARITY_TOLERANCE = 1e-5
TARGET_OPSET = 15


class ExportError(RuntimeError):
    """The exported graph does not reproduce XGBoost (or the model cannot be exported)."""


@dataclass(frozen=True)
class ParityReport:
    rows: int
    max_abs_diff: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def _objective(booster: Any) -> str:
    return str(json.loads(booster.save_config())["learner"]["objective"]["name"])


def _num_class(booster: Any) -> int:
    return int(json.loads(booster.save_config())["learner"]["learner_model_param"]["num_class"])


def _wrap(booster: Any) -> tuple[Any, str]:
    """An sklearn wrapper around a booster (what onnxmltools converts) and its kind."""
    import xgboost as xgb

    objective = _objective(booster)
    booster = booster.copy()
    booster.feature_names = None
    booster.feature_types = None
    raw = bytearray(booster.save_raw("ubj"))
    if objective.startswith(("binary:logistic", "multi:softprob", "multi:softmax")):
        classifier = xgb.XGBClassifier()
        classifier.load_model(raw)
        return classifier, "xgboost-classifier"
    if objective == "reg:logistic":
        raise ExportError("reg:logistic does not convert to ONNX correctly; train a classifier "
                          "(binary:logistic) for probabilities instead")
    if objective.startswith(("reg:", "count:", "rank:", "survival:")):
        regressor = xgb.XGBRegressor()
        regressor.load_model(raw)
        return regressor, "xgboost-regressor"
    raise ExportError(f"objective {objective!r} is not supported for export")


def _native_outputs(model: Any, kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "xgboost-classifier":
        return np.asarray(model.predict_proba(x), dtype=np.float64)
    return np.asarray(model.predict(x), dtype=np.float64).reshape(-1, 1)


def _convert(model: Any, width: int) -> bytes:
    import onnxmltools
    from onnxmltools.convert.common.data_types import FloatTensorType

    onx = onnxmltools.convert_xgboost(model, initial_types=[("input", FloatTensorType([None, width]))],
                                      target_opset=TARGET_OPSET)
    return onx.SerializeToString()


def check_parity(model_bytes: bytes, model: Any, kind: str, x: np.ndarray,
                 tolerance: float = PARITY_TOLERANCE) -> ParityReport:
    """Compare ONNX Runtime against XGBoost on rows `x` (held out from training)."""
    import onnxruntime as ort

    from model_server.runtime import session_options

    session = ort.InferenceSession(model_bytes, session_options(), providers=["CPUExecutionProvider"])
    output = "probabilities" if kind == "xgboost-classifier" else "variable"
    ours = np.asarray(session.run([output], {"input": x.astype(np.float32)})[0], dtype=np.float64)
    theirs = _native_outputs(model, kind, x.astype(np.float32))
    if ours.shape != theirs.shape:
        raise ExportError(f"ONNX output shape {ours.shape} differs from XGBoost's {theirs.shape}")
    return ParityReport(len(x), float(np.max(np.abs(ours - theirs))) if len(x) else 0.0, tolerance)


def _manifest(name: str, kind: str, feature_names: Sequence[str], n_class: int,
              training: dict[str, Any]) -> Manifest:
    width = len(feature_names)
    if kind == "xgboost-classifier":
        outputs = (TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, n_class)))
        output_names: tuple[str, ...] = ("probability",) if n_class == 2 else tuple(
            f"class_{i}" for i in range(n_class))
        score_output = "probabilities"
    else:
        outputs = (TensorSpec("variable", "FP32", (-1, 1)),)
        output_names = ("prediction",)
        score_output = "variable"
    return Manifest(
        name=name, kind=kind, feature_names=tuple(feature_names),
        inputs=(TensorSpec("input", "FP32", (-1, width)),), outputs=outputs,
        score_output=score_output, score_column=-1, output_names=output_names,
        allow_nan=True, training=training)


def export_model(model: Any, *, name: str, repository: str | os.PathLike[str], feature_names: Sequence[str],
                 holdout: np.ndarray, training: dict[str, Any] | None = None,
                 tolerance: float = PARITY_TOLERANCE) -> Published:
    """Convert a fitted XGBClassifier/XGBRegressor (or a Booster), check parity, publish a version."""
    import xgboost as xgb

    booster = model if isinstance(model, xgb.Booster) else model.get_booster()
    wrapped, kind = _wrap(booster)
    width = len(feature_names)
    if booster.num_features() != width:
        raise ExportError(f"the model takes {booster.num_features()} features but {width} names were given")
    holdout = np.asarray(holdout, dtype=np.float32)
    if holdout.ndim != 2 or holdout.shape[1] != width or len(holdout) == 0:
        raise ExportError(f"parity rows must be a non-empty (n, {width}) array")
    model_bytes = _convert(wrapped, width)
    parity = check_parity(model_bytes, wrapped, kind, holdout, tolerance)
    if not parity.passed:
        raise ExportError(f"export refused: ONNX differs from XGBoost by {parity.max_abs_diff:.3g} on "
                          f"{parity.rows} held-out rows (tolerance {tolerance:g})")
    n_class = max(_num_class(booster), 2) if kind == "xgboost-classifier" else 1
    meta = {"framework": "xgboost", "xgboost_version": xgb.__version__, "objective": _objective(booster),
            "num_trees": len(booster.get_dump()), "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "parity": {"rows": parity.rows, "max_abs_diff": parity.max_abs_diff, "tolerance": tolerance},
            **(training or {})}
    return publish(repository, _manifest(name, kind, feature_names, n_class, meta), model_bytes)


def train_xgboost(x: np.ndarray, y: np.ndarray, *, name: str, repository: str | os.PathLike[str],
                  feature_names: Sequence[str] | None = None, task: str = "auto",
                  params: dict[str, Any] | None = None, holdout_fraction: float = 0.2, seed: int = 0,
                  tolerance: float = PARITY_TOLERANCE) -> Published:
    """Train a classifier or regressor on `x`, `y`, export it to ONNX and publish a version.

    `task` is "classifier", "regressor" or "auto" (a classifier when `y` holds a few integer
    classes). A random `holdout_fraction` of rows is kept out of training; it reports the
    held-out metric and drives the export parity check.
    """
    import xgboost as xgb

    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y)
    if x.ndim != 2 or len(x) != len(y) or len(x) < 10:
        raise ValueError(f"need a 2-D feature matrix and one label per row (at least 10 rows); "
                         f"got {x.shape}, {y.shape}")
    names = list(feature_names) if feature_names is not None else [f"f{i}" for i in range(x.shape[1])]
    if len(names) != x.shape[1]:
        raise ValueError(f"{len(names)} feature names for {x.shape[1]} columns")
    if task == "auto":
        values = np.unique(y[~np.isnan(y)] if y.dtype.kind == "f" else y)
        task = "classifier" if len(values) <= 20 and np.all(np.mod(values, 1) == 0) else "regressor"
    if task not in ("classifier", "regressor"):
        raise ValueError(f"task must be classifier, regressor or auto; got {task!r}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_hold = max(1, int(len(x) * holdout_fraction))
    hold, train = order[:n_hold], order[n_hold:]
    settings = {"n_estimators": 100, "max_depth": 6, "learning_rate": 0.1, "random_state": seed, **(params or {})}
    if task == "classifier":
        classes = np.unique(y)
        if not np.array_equal(classes, np.arange(len(classes))):
            raise ValueError(f"classifier labels must be 0..K-1; got {classes[:10].tolist()}")
        model = xgb.XGBClassifier(**settings)
    else:
        model = xgb.XGBRegressor(**settings)
    model.fit(x[train], y[train])
    if task == "classifier":
        proba = model.predict_proba(x[hold])
        p_true = proba[np.arange(n_hold), y[hold].astype(int)]
        metric = {"holdout_log_loss": float(-np.mean(np.log(np.clip(p_true, 1e-12, 1)))),
                  "holdout_accuracy": float(np.mean(np.argmax(proba, axis=1) == y[hold]))}
    else:
        pred = model.predict(x[hold])
        metric = {"holdout_rmse": float(np.sqrt(np.mean((pred - y[hold]) ** 2)))}
    training = {"task": task, "params": settings, "rows_train": len(train), "rows_holdout": n_hold, **metric}
    return export_model(model, name=name, repository=repository, feature_names=names, holdout=x[hold],
                        training=training, tolerance=tolerance)


def export_model_file(path: str | os.PathLike[str], *, name: str, repository: str | os.PathLike[str],
                      feature_names: Sequence[str] | None, holdout: np.ndarray | None = None,
                      tolerance: float = PARITY_TOLERANCE, seed: int = 0) -> Published:
    """Export an existing XGBoost model file (JSON or UBJ).

    Parity rows: `holdout` if given (real data is best), else 1,000 rows drawn around the
    split thresholds the trees actually use, so every branch direction is exercised.
    """
    import xgboost as xgb

    booster = xgb.Booster()
    booster.load_model(str(path))
    stored = booster.feature_names
    width = booster.num_features()
    names = list(feature_names) if feature_names else (list(stored) if stored else [f"f{i}" for i in range(width)])
    if holdout is None:
        holdout = _rows_around_splits(booster, width, np.random.default_rng(seed))
    return export_model(booster, name=name, repository=repository, feature_names=names, holdout=holdout,
                        training={"source_file": str(Path(path).resolve())}, tolerance=tolerance)


def _rows_around_splits(booster: Any, width: int, rng: np.random.Generator, n: int = 1000) -> np.ndarray:
    """Synthetic rows whose values sit on both sides of the trees' split thresholds."""
    frame = booster.trees_to_dataframe()
    splits = frame[frame["Feature"] != "Leaf"]
    rows = rng.normal(size=(n, width)).astype(np.float32)
    names = booster.feature_names or [f"f{i}" for i in range(width)]
    index = {n_: i for i, n_ in enumerate(names)}
    for feature, group in splits.groupby("Feature"):
        col = index.get(str(feature))
        if col is None:
            continue
        thresholds = group["Split"].to_numpy(dtype=np.float64)
        picks = rng.choice(thresholds, size=n)
        rows[:, col] = (picks + rng.choice([-1e-3, 1e-3], size=n) * np.maximum(1.0, np.abs(picks))).astype(np.float32)
    return rows
