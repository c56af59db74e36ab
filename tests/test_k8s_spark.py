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
        if "secret" in volume:  # created by the operator of the cluster, as for prod's servers
            assert volume["secret"]["secretName"] == "twofold-lake-credentials"
    assert mounts[args.out] == "results"
    # The lake prod's servers write, with the credentials file they read, on driver and executors.
    (settings,) = [c for c in find(docs, "ConfigMap") if c["metadata"]["name"].startswith("twofold-settings-")]
    assert args.lake == settings["data"]["TWOFOLD_LAKE"] and args.lake.startswith("s3://")
    conf = spec["sparkConf"]
    assert conf["spark.hadoop.fs.s3a.endpoint.region"] == settings["data"]["AWS_REGION"]
    for role in ("driver", "executor"):
        role_mounts = {m["name"]: m for m in spec[role]["volumeMounts"]}
        credentials = role_mounts["lake-credentials"]
        assert credentials["readOnly"] is True
        (env,) = [e for e in spec[role]["env"] if e["name"] == "AWS_CREDENTIAL_PROFILES_FILE"]
        assert env["value"].startswith(credentials["mountPath"] + "/")
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
    # s3a:// needs hadoop-aws of the Hadoop that Spark 3.5 ships (3.3.4).
    assert "hadoop-aws-3.3.4.jar" in dockerfile and version.startswith("3.5.")
    # The `spark` extra (what runs the engine off the cluster) is the same minor version of Spark.
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"pyspark>=3.5,<4"' in pyproject and version.startswith("3.5.")
    # The image's entrypoint file runs the same CLI.
    assert "from twofold.cli import main" in dockerfile
    assert app["spec"]["template"]["mainApplicationFile"] == "local:///opt/twofold/twofold_main.py"
