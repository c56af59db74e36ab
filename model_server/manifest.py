"""The manifest that sits beside every `model.onnx`: what the graph expects and what it returns.

A version directory is `<repository>/<model>/<version>/` holding `model.onnx` and
`manifest.json`. The manifest is written last (the whole directory is published by one
rename, see `publish.py`), and it records the SHA-256 of `model.onnx`, so a server can tell a
complete version from a half-written or corrupted one without trusting timestamps.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"
# Model names become folder names: no separators, no leading dot (hidden/temporary folders).
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MODEL_FILE = "model.onnx"
FORMAT_VERSION = 1

# Kinds a server knows how to serve. Predictors take feature rows and return outputs;
# policies additionally take a `random` input and return an arm and its propensity.
PREDICTOR_KINDS = ("xgboost-classifier", "xgboost-regressor")
POLICY_KINDS = ("bandit-linucb", "bandit-thompson", "bandit-epsilon-greedy")
KINDS = PREDICTOR_KINDS + POLICY_KINDS


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or inconsistent with its model file."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as the Open Inference Protocol describes it (-1 = any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), str(data["datatype"]), tuple(int(x) for x in data["shape"]))


@dataclass(frozen=True)
class Manifest:
    """Everything a server or client needs to know about one model version."""

    name: str
    kind: str
    feature_names: tuple[str, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # The graph output Predict and Score read, and its column used as the score (-1: last).
    score_output: str
    score_column: int = -1
    # Names of the columns Predict returns (e.g. ["probability"], or one per class or arm).
    output_names: tuple[str, ...] = ()
    # Whether NaN is a legal feature value (XGBoost: "missing"; linear policies: never).
    allow_nan: bool = False
    # Bandit policies: arm names, and how many uniform numbers the `random` input takes.
    arms: tuple[str, ...] = ()
    random_width: int = 0
    model_sha256: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT_VERSION

    @property
    def is_policy(self) -> bool:
        return self.kind in POLICY_KINDS

    @property
    def input_name(self) -> str:
        return self.inputs[0].name

    def to_json(self) -> str:
        data = asdict(self)
        return json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        try:
            manifest = cls(
                name=str(data["name"]),
                kind=str(data["kind"]),
                feature_names=tuple(str(n) for n in data["feature_names"]),
                inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
                outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
                score_output=str(data["score_output"]),
                score_column=int(data.get("score_column", -1)),
                output_names=tuple(str(n) for n in data.get("output_names", ())),
                allow_nan=bool(data.get("allow_nan", False)),
                arms=tuple(str(a) for a in data.get("arms", ())),
                random_width=int(data.get("random_width", 0)),
                model_sha256=str(data.get("model_sha256", "")),
                training=dict(data.get("training", {})),
                evaluation=dict(data.get("evaluation", {})),
                format=int(data.get("format", FORMAT_VERSION)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"manifest is missing or has a malformed field: {exc!r}") from exc
        manifest.validate()
        return manifest

    def validate(self) -> None:
        """Refuse manifests that a server could not serve correctly."""
        if self.format != FORMAT_VERSION:
            raise ManifestError(f"unsupported manifest format {self.format} (this server reads {FORMAT_VERSION})")
        if not MODEL_NAME.fullmatch(self.name):
            raise ManifestError(f"model name {self.name!r} must match {MODEL_NAME.pattern} (it names a folder)")
        if self.kind not in KINDS:
            raise ManifestError(f"unknown kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if not self.feature_names or len(set(self.feature_names)) != len(self.feature_names):
            raise ManifestError("feature_names must be a non-empty list of distinct names")
        if not self.inputs or self.inputs[0].shape[-1] != len(self.feature_names):
            raise ManifestError("the first input's last dimension must equal the number of feature names")
        if self.score_output not in {o.name for o in self.outputs}:
            raise ManifestError(f"score_output {self.score_output!r} is not one of the outputs")
        if self.is_policy:
            if len(self.arms) < 2 or len(set(self.arms)) != len(self.arms):
                raise ManifestError("a bandit policy needs at least two distinct arm names")
            if self.random_width < 1 or len(self.inputs) != 2:
                raise ManifestError("a bandit policy takes `context` and `random` inputs (random_width >= 1)")


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks (model files can be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(version_dir: Path) -> Manifest:
    """Read and validate a version's manifest and check the model file's checksum."""
    path = version_dir / MANIFEST_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ManifestError(f"{path} does not exist (version incomplete)") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{path} must hold a JSON object")
    manifest = Manifest.from_dict(data)
    model_path = version_dir / MODEL_FILE
    if not model_path.is_file():
        raise ManifestError(f"{model_path} does not exist")
    if manifest.model_sha256 and sha256_file(model_path) != manifest.model_sha256:
        raise ManifestError(f"{model_path} does not match the manifest's sha256 (corrupted or half-written)")
    return manifest
