"""k8s/overlays/spark: the analysis as a Spark operator application, checked offline.

The ScheduledSparkApplication is a custom resource (no schema in kubernetes-validate), so its
content is checked here: the driver's arguments are a valid `twofold analyze --engine spark`
command line, every volume exists in the overlay, the Spark version matches the image's.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from tests.k8s_support import ROOT, find, one, render

OVERLAY = ROOT / "k8s" / "overlays" / "spark"


def _analyze_parser() -> argparse.ArgumentParser:
    from analysis_worker.cli import ANALYZE

    parser = argparse.ArgumentParser(prog="twofold analyze")
    ANALYZE.configure(parser)
    return parser


def test_spark_overlay_runs_twofold_analyze_on_spark() -> None:
    docs = render("spark")
    (app,) = find(docs, "ScheduledSparkApplication")
    assert app["apiVersion"] == "sparkoperator.k8s.io/v1beta2"
    assert app["spec"]["concurrencyPolicy"] == "Forbid"
    spec = app["spec"]["template"]
    assert spec["type"] == "Python" and spec["mode"] == "cluster"
    assert spec["arguments"][0] == "analyze"
    args = _analyze_parser().parse_args(spec["arguments"][1:])
    assert args.engine == "spark" and args.spark_master is None  # spark-submit's cluster session
    # The experiment is one the experiments ConfigMap mounted at that path holds.
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in spec["driver"]["volumeMounts"]}
    experiments = one(docs, "ConfigMap", volumes[mounts["/etc/twofold/experiments"]]["configMap"]["name"])
    assert Path(args.experiment).name in experiments["data"]
    claims = {c["metadata"]["name"] for c in find(docs, "PersistentVolumeClaim")}
    for volume in volumes.values():
        if "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"]["claimName"] in claims
    assert mounts[args.lake] == "lake" and mounts[args.out] == "results"
    executor_mounts = {m["mountPath"]: m for m in spec["executor"]["volumeMounts"]}
    assert executor_mounts[args.lake]["readOnly"] is True
    # The driver's service account may create its executors, and exists.
    for role in ("driver", "executor"):
        assert spec[role]["securityContext"]["runAsNonRoot"] is True
        one(docs, "ServiceAccount", spec[role]["serviceAccount"])
    binding = one(docs, "RoleBinding", "spark-analysis")
    assert binding["subjects"][0]["name"] == spec["driver"]["serviceAccount"]
    # The rest of prod is there unchanged.
    assert {d["metadata"]["name"] for d in find(docs, "Deployment")} == \
        {d["metadata"]["name"] for d in find(render("prod"), "Deployment")}


def test_spark_versions_agree_between_application_and_image() -> None:
    (app,) = find(render("spark"), "ScheduledSparkApplication")
    version = app["spec"]["template"]["sparkVersion"]
    dockerfile = (OVERLAY / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM apache/spark:([0-9.]+)-", dockerfile, flags=re.MULTILINE)
    assert base == version and f"pyspark=={version}" in dockerfile
    # The `spark` extra (what runs the engine off the cluster) is the same minor version of Spark.
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"pyspark>=3.5,<4"' in pyproject and version.startswith("3.5.")
    # The image's entrypoint file runs the same CLI.
    assert "from twofold.cli import main" in dockerfile
    assert app["spec"]["template"]["mainApplicationFile"] == "local:///opt/twofold/twofold_main.py"
