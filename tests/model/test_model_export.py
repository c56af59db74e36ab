"""XGBoost training and ONNX export: parity with XGBoost, manifests, refusals, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import xgboost as xgb

from model_server.export_xgboost import ExportError, export_model, export_model_file
from model_server.manifest import read_manifest
from model_server.runtime import session_options
from tests.model.conftest import FEATURES, Repo, make_data

ROOT = Path(__file__).resolve().parents[2]


def run_onnx(path: Path, x: np.ndarray, output: str) -> np.ndarray:
    session = ort.InferenceSession(str(path / "model.onnx"), session_options())
    return session.run([output], {"input": x.astype(np.float32)})[0]


def test_trained_classifier_manifest_and_parity(model_repo: Repo) -> None:
    version = model_repo.root / "ranker" / "1"
    manifest = read_manifest(version)
    assert manifest.kind == "xgboost-classifier"
    assert list(manifest.feature_names) == FEATURES
    assert [o.name for o in manifest.outputs] == ["label", "probabilities"]
    assert manifest.output_names == ("probability",)
    training = manifest.training
    assert training["parity"]["max_abs_diff"] <= 1e-5 and training["parity"]["rows"] == 400
    assert training["rows_train"] == 1600 and 0.5 < training["holdout_accuracy"] <= 1.0
    assert training["objective"] == "binary:logistic" and training["num_trees"] == 60


def test_exported_models_match_xgboost_on_new_rows(tmp_path: Path) -> None:
    x, y = make_data(1500, seed=21)
    fresh, _ = make_data(500, seed=22)
    fresh[::7, 3] = np.nan  # missing values take XGBoost's default branch in both
    classifier = xgb.XGBClassifier(n_estimators=80, max_depth=5).fit(x, y)
    published = export_model(classifier, name="clf", repository=tmp_path, feature_names=FEATURES, holdout=x[:200])
    ours = run_onnx(published.path, fresh, "probabilities")
    assert np.max(np.abs(ours - classifier.predict_proba(fresh))) <= 1e-5
    target = x[:, 0] * 3 - x[:, 1] ** 2
    regressor = xgb.XGBRegressor(n_estimators=80, max_depth=5).fit(x, target)
    published = export_model(regressor, name="reg", repository=tmp_path, feature_names=FEATURES, holdout=x[:200])
    assert published.manifest.kind == "xgboost-regressor"
    ours = run_onnx(published.path, fresh, "variable")[:, 0]
    assert np.max(np.abs(ours - regressor.predict(fresh))) <= 1e-5
    multi = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5)
    m = xgb.XGBClassifier(n_estimators=30).fit(x, multi)
    published = export_model(m, name="multi", repository=tmp_path, feature_names=FEATURES, holdout=x[:100])
    assert published.manifest.output_names == ("class_0", "class_1", "class_2")
    assert np.max(np.abs(run_onnx(published.path, fresh, "probabilities") - m.predict_proba(fresh))) <= 1e-5


def test_parity_failure_refuses_the_export(tmp_path: Path) -> None:
    x, _ = make_data(500, seed=23)
    regressor = xgb.XGBRegressor(n_estimators=50).fit(x, x[:, 0] * 1000 + x[:, 1])
    with pytest.raises(ExportError, match=r"export refused: ONNX differs from XGBoost by .* on 100 held-out rows"):
        export_model(regressor, name="reg", repository=tmp_path, feature_names=FEATURES, holdout=x[:100],
                     tolerance=1e-12)
    assert not (tmp_path / "reg").exists() or not any((tmp_path / "reg").iterdir())


def test_reg_logistic_is_refused_with_advice(tmp_path: Path) -> None:
    x, y = make_data(300, seed=24)
    model = xgb.XGBRegressor(objective="reg:logistic", n_estimators=5).fit(x, y)
    with pytest.raises(ExportError, match="train a classifier"):
        export_model(model, name="bad", repository=tmp_path, feature_names=FEATURES, holdout=x[:10])


def test_wrong_feature_names_are_refused(tmp_path: Path) -> None:
    x, y = make_data(300, seed=25)
    model = xgb.XGBClassifier(n_estimators=5).fit(x, y)
    with pytest.raises(ExportError, match="takes 6 features but 2 names"):
        export_model(model, name="bad", repository=tmp_path, feature_names=["a", "b"], holdout=x[:10])


@pytest.mark.parametrize("suffix", ["json", "ubj"])
def test_existing_model_files_export(tmp_path: Path, suffix: str) -> None:
    x, y = make_data(800, seed=26)
    import pandas as pd

    frame = pd.DataFrame(x, columns=FEATURES)  # a model trained with real column names
    model = xgb.XGBClassifier(n_estimators=40).fit(frame, y)
    path = tmp_path / f"model.{suffix}"
    model.save_model(path)
    published = export_model_file(path, name="file", repository=tmp_path / "repo", feature_names=None)
    assert list(published.manifest.feature_names) == FEATURES  # taken from the file
    assert published.manifest.training["parity"]["rows"] == 1000
    fresh, _ = make_data(300, seed=27)
    assert np.max(np.abs(run_onnx(published.path, fresh, "probabilities") - model.predict_proba(fresh))) <= 1e-5


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "twofold", "train", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_trains_from_parquet_and_csv(tmp_path: Path) -> None:
    x, y = make_data(600, seed=28)
    table = pa.table({**{n: x[:, i] for i, n in enumerate(FEATURES)}, "label": y,
                      "comment": ["free text"] * len(y)})
    pq.write_table(table, tmp_path / "train.parquet")
    pacsv.write_csv(table, tmp_path / "train.csv")
    repo = tmp_path / "repo"
    first = _cli("xgboost", "--data", str(tmp_path / "train.parquet"), "--label", "label", "--model", "m",
                 "--repository", str(repo), "--param", "n_estimators=20")
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert (out["version"], out["kind"], out["features"]) == ("1", "xgboost-classifier", FEATURES)
    assert out["training"]["params"]["n_estimators"] == 20
    second = _cli("xgboost", "--data", str(tmp_path / "train.csv"), "--label", "label", "--model", "m",
                  "--repository", str(repo), "--features", "age,clicks", "--task", "regressor")
    assert second.returncode == 0, second.stderr
    out = json.loads(second.stdout)
    assert (out["version"], out["kind"], out["features"]) == ("2", "xgboost-regressor", ["age", "clicks"])
    bad = _cli("xgboost", "--data", str(tmp_path / "train.csv"), "--label", "nope", "--model", "m",
               "--repository", str(repo))
    assert bad.returncode == 2 and "label column 'nope' is not in the data" in bad.stderr
    # An existing model file, with the table supplying feature names and parity rows.
    model = xgb.XGBClassifier(n_estimators=15).fit(x, y)
    model.save_model(tmp_path / "existing.json")
    exported = _cli("xgboost", "--from-model", str(tmp_path / "existing.json"), "--data",
                    str(tmp_path / "train.parquet"), "--label", "label", "--model", "m", "--repository", str(repo))
    assert exported.returncode == 0, exported.stderr
    out = json.loads(exported.stdout)
    assert (out["version"], out["features"]) == ("3", FEATURES)
    assert out["training"]["parity"]["rows"] == 600 and out["training"]["parity"]["max_abs_diff"] <= 1e-5
    assert np.max(np.abs(run_onnx(repo / "m" / "3", x, "probabilities") - model.predict_proba(x))) <= 1e-5


def test_model_names_must_be_folder_safe(tmp_path: Path) -> None:
    x, y = make_data(200, seed=29)
    model = xgb.XGBClassifier(n_estimators=3).fit(x, y)
    for bad in ("../escape", "a/b", ".hidden", ""):
        with pytest.raises(ValueError, match="must match"):
            export_model(model, name=bad, repository=tmp_path / "repo", feature_names=FEATURES, holdout=x[:10])
    assert not (tmp_path / "escape").exists()
