"""`twofold serve-model` and `twofold train {xgboost,bandit}`.

Imports stay inside the `run` functions: `twofold --help` must not load ONNX Runtime, and
serving must not need the `train` extra (XGBoost, onnxmltools, onnx).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from twofold.cli import Command
from twofold.lakestore import add_storage_arguments, add_writer_arguments
from twofold.settings import add_server_arguments, env_default

DEFAULT_PORT = 50052
log = logging.getLogger("twofold.model.cli")


# ---------------------------------------------------------------------------------- serve-model
def _configure_serve(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model server")
    g.add_argument("--repository", default=env_default("model_repository", None), required=False,
                   help="model repository folder: <repository>/<model>/<version>/ [TWOFOLD_MODEL_REPOSITORY]")
    g.add_argument("--lake", default=env_default("lake", "data/lake"),
                   help="lake root for the decision log, a folder or a URL (s3://bucket/prefix); 'none' to "
                        "disable logging [TWOFOLD_LAKE]")
    add_writer_arguments(g)
    g.add_argument("--workers", type=int, default=int(env_default("workers", "1") or 1),
                   help="server processes sharing the port (forked before gRPC starts) [TWOFOLD_WORKERS]")
    g.add_argument("--version-policy", default=env_default("version_policy", "latest:1"),
                   help="versions to serve unless a model's config.yaml says otherwise: latest:N, "
                        "specific:V1,V2 or all [TWOFOLD_VERSION_POLICY]")
    g.add_argument("--poll-seconds", type=float, default=float(env_default("poll_seconds", "1.0") or 1.0),
                   help="how often to look for new versions; 0 disables watching [TWOFOLD_POLL_SECONDS]")
    g.add_argument("--durable-decisions", action="store_true",
                   default=(env_default("durable_decisions", "") or "").lower() in {"1", "true", "yes"},
                   help="answer Decide only once its record is fsynced (adds the fsync to each call) "
                        "[TWOFOLD_DURABLE_DECISIONS]")
    g.add_argument("--batch-threads", type=int, default=int(env_default("batch_threads", "0") or 0),
                   help="ONNX Runtime threads for calls of 64 rows or more (Score); 0: 2 when a core per worker "
                        "is left over, else 1 [TWOFOLD_BATCH_THREADS]")
    g.add_argument("--coalesce-window-ms", type=float, default=_optional_float(env_default("coalesce_window_ms", None)),
                   help="while calls queue, join concurrent one-row Predict/Decide runs of a model "
                        "version for up to this long (default 1; 0 turns it off) [TWOFOLD_COALESCE_WINDOW_MS]")
    g.add_argument("--coalesce-max-rows", type=int, default=_optional_int(env_default("coalesce_max_rows", None)),
                   help="rows at which a coalesced run starts at once, 2-63 (default 32) [TWOFOLD_COALESCE_MAX_ROWS]")
    g.add_argument("--decision-max-lag-ms", type=float,
                   default=float(env_default("decision_max_lag_ms", "40") or 40),
                   help="Decide waits (back-pressure) while the decision log's oldest unsynced batch is older "
                        "than this, so a SIGKILL loses only decisions answered within about the 20 ms batch "
                        "interval plus this (default 40) [TWOFOLD_DECISION_MAX_LAG_MS]")
    add_server_arguments(parser, default_port=DEFAULT_PORT)


def _optional_float(text: str | None) -> float | None:
    return float(text) if text else None


def _optional_int(text: str | None) -> int | None:
    return int(text) if text else None


def batch_threads(args: argparse.Namespace) -> int:
    """`--batch-threads`, or by default 2 when the machine has at least two cores per worker."""
    if args.batch_threads > 0:
        return int(args.batch_threads)
    return 2 if (os.cpu_count() or 1) >= 2 * args.workers else 1


def _serve_one(args: argparse.Namespace) -> int:
    from model_server.app import ModelServerConfig, build
    from model_server.version_policy import VersionPolicy
    from twofold.server import ServerSettings, ServiceSetup, run_service

    coalescing = {"coalesce_window_ms": args.coalesce_window_ms, "coalesce_max_rows": args.coalesce_max_rows}
    config = ModelServerConfig(
        repository=args.repository, lake=None if str(args.lake).lower() in ("", "none") else args.lake,
        version_policy=VersionPolicy.parse(args.version_policy), poll_seconds=args.poll_seconds,
        durable_decisions=args.durable_decisions, batch_threads=batch_threads(args),
        decision_max_lag_ms=args.decision_max_lag_ms, pool_threads=getattr(args, "pool_threads", 0),
        writer_id=getattr(args, "writer_id", None), wal_dir=getattr(args, "wal_dir", None),
        **{k: v for k, v in coalescing.items() if v is not None})

    async def setup(_settings: ServerSettings) -> ServiceSetup:
        return (await build(config)).setup

    return run_service(args, setup)


def _run_serve(args: argparse.Namespace) -> int:
    problems = []
    if not args.repository:
        problems.append("--repository is required (or TWOFOLD_MODEL_REPOSITORY)")
    elif not Path(args.repository).is_dir():
        problems.append(f"--repository {args.repository} is not a folder")
    if args.workers < 1:
        problems.append("--workers must be at least 1")
    if args.batch_threads < 0:
        problems.append("--batch-threads must be 0 (automatic) or more")
    if not 1 <= args.decision_max_lag_ms <= 10_000:
        problems.append("--decision-max-lag-ms must be between 1 and 10000")
    if args.coalesce_window_ms is not None and not 0 <= args.coalesce_window_ms <= 100:
        problems.append("--coalesce-window-ms must be between 0 (off) and 100")
    if args.coalesce_max_rows is not None and not 2 <= args.coalesce_max_rows <= 63:
        problems.append("--coalesce-max-rows must be between 2 and 63 (runs of 64 rows go to the batch session)")
    try:
        from model_server.version_policy import VersionPolicy

        VersionPolicy.parse(args.version_policy)
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        for problem in problems:
            print(f"twofold serve-model: {problem}", file=sys.stderr)
        return 2
    from twofold.lakestore import apply_storage_arguments

    apply_storage_arguments(args)
    args.batch_threads = batch_threads(args)  # before forking: workers see workers=1
    from model_server.batch_pool import default_threads

    args.pool_threads = default_threads(args.workers)
    if args.workers == 1:
        return _serve_one(args)
    from model_server.workers import run_workers

    return run_workers(args, _serve_one)


SERVE = Command(configure=_configure_serve, run=_run_serve)


# ---------------------------------------------------------------------------------------- train
def _duration(text: str) -> dt.timedelta:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|m|h|d)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"durations look like 30s, 15m, 1h or 7d; got {text!r}")
    value, unit = float(match.group(1)), match.group(2)
    return dt.timedelta(seconds=value * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit])


def _timestamp(text: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an ISO 8601 time, got {text!r}") from exc
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _param(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"parameters look like key=value; got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def _configure_train(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="trainer", metavar="KIND", required=True)
    xgb = sub.add_parser("xgboost", help="train (or export) an XGBoost model and publish it as ONNX")
    xgb.add_argument("--data", help="training data: .parquet or .csv (one row per example)")
    xgb.add_argument("--label", help="label column (0..K-1 for a classifier, numbers for a regressor)")
    xgb.add_argument("--features", help="comma-separated feature columns, in order (default: all numeric "
                                        "columns except the label)")
    xgb.add_argument("--model", required=True, help="model name in the repository")
    xgb.add_argument("--repository", required=True, help="model repository folder")
    xgb.add_argument("--task", choices=["auto", "classifier", "regressor"], default="auto")
    xgb.add_argument("--param", type=_param, action="append", default=[],
                     help="XGBoost parameter key=value (repeatable), e.g. --param n_estimators=200")
    xgb.add_argument("--holdout", type=float, default=0.2, help="share of rows held out for metrics and parity")
    xgb.add_argument("--from-model", help="export this existing XGBoost model file (.json/.ubj) instead of "
                                          "training; --data, if given, supplies the parity rows")
    xgb.add_argument("--tolerance", type=float, default=1e-5, help="largest ONNX vs XGBoost difference allowed")

    bandit = sub.add_parser("bandit", help="fit a bandit policy from the lake (or publish an untrained one)")
    bandit.add_argument("--model", required=True, help="policy name in the repository")
    bandit.add_argument("--repository", required=True, help="model repository folder")
    bandit.add_argument("--lake", default=env_default("lake", "data/lake"),
                        help="lake root, a folder or a URL (s3://bucket/lake) [TWOFOLD_LAKE]")
    add_storage_arguments(bandit)
    bandit.add_argument("--reward-event", help="event name that is the reward")
    bandit.add_argument("--window", type=_duration, default=dt.timedelta(hours=1),
                        help="reward window after each decision (30s, 15m, 1h, 7d)")
    bandit.add_argument("--reward", choices=["occurrence", "count", "value"], default="occurrence",
                        help="reward per decision: any event (1/0), number of events, or sum of values")
    bandit.add_argument("--policy", choices=["linucb", "thompson", "epsilon-greedy"],
                        help="policy kind (default: the published version's, else linucb)")
    bandit.add_argument("--alpha", type=float, help="LinUCB confidence bonus")
    bandit.add_argument("--epsilon", type=float, help="epsilon-greedy exploration share")
    bandit.add_argument("--scale", type=float, help="Thompson posterior scale")
    bandit.add_argument("--draws", type=int, help="Thompson draws per decision")
    bandit.add_argument("--floor", type=float, help="minimum propensity of every arm")
    bandit.add_argument("--ridge", type=float, help="ridge regularisation")
    bandit.add_argument("--base", choices=["linear", "xgboost"],
                        help="epsilon-greedy's reward model: ridge per arm, or XGBoost over [context, arm]")
    bandit.add_argument("--arms", help="comma-separated arm names (default: the published version's)")
    bandit.add_argument("--features", help="comma-separated feature names (default: the published version's)")
    bandit.add_argument("--holdout", type=float, default=0.2,
                        help="newest share of decisions kept for the off-policy evaluation")
    bandit.add_argument("--gate", choices=["none", "not-worse", "better"], default="not-worse",
                        help="publish rule on the paired difference candidate (SNIPS) - logged policy, on the "
                             "evaluation rows: not-worse publishes when its lower confidence bound is above "
                             "-margin x logged value (a candidate worse than that is published in at most "
                             "1 - confidence of runs); better when it is above 0; none always")
    bandit.add_argument("--gate-margin", type=float,
                        help="not-worse: tolerated shortfall as a share of the logged policy's value (default 0.05)")
    bandit.add_argument("--gate-confidence", type=float,
                        help="one-sided confidence of the gate's lower bound (default 0.95)")
    bandit.add_argument("--min-ess", type=float,
                        help="refuse when the effective sample size of the evaluation rows is below this "
                             "(default 100)")
    bandit.add_argument("--since", type=_timestamp, help="only decisions at or after this time")
    bandit.add_argument("--as-of", type=_timestamp, help="treat this as now (default: the current time)")
    bandit.add_argument("--init", action="store_true",
                        help="publish an untrained policy (uniform exploration) from --arms and --features")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])


def _read_table(path: str) -> Any:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if not Path(path).exists():
        raise ValueError(f"--data {path}: no such file or folder (`twofold example data --out DIR` writes "
                         "example training data to DIR/users.parquet)")
    if path.endswith(".parquet") or Path(path).is_dir():
        return pq.read_table(path)
    if path.endswith(".csv"):
        return pacsv.read_csv(path)
    raise ValueError(f"--data must be a .parquet or .csv file; got {path}")


def _feature_matrix(table: Any, label: str | None, features: str | None) -> tuple[Any, list[str]]:
    import numpy as np
    import pyarrow as pa

    if features:
        names = [f.strip() for f in features.split(",") if f.strip()]
        missing = [n for n in names if n not in table.column_names]
        if missing:
            raise ValueError(f"feature columns {missing} are not in the data ({', '.join(table.column_names)})")
    else:
        names = [f.name for f in table.schema if f.name != label and (pa.types.is_integer(f.type)
                 or pa.types.is_floating(f.type) or pa.types.is_boolean(f.type))]
    if not names:
        raise ValueError("no numeric feature columns found")
    columns = [table.column(n).cast(pa.float32()).to_numpy(zero_copy_only=False) for n in names]
    return np.column_stack(columns).astype(np.float32), names


def _run_train_xgboost(args: argparse.Namespace) -> dict[str, Any]:
    from model_server.export_xgboost import export_model_file, train_xgboost

    if args.from_model:
        holdout, names = None, None
        if args.data:
            table = _read_table(args.data)
            holdout, names = _feature_matrix(table, args.label, args.features)
        elif args.features:
            names = [f.strip() for f in args.features.split(",")]
        published = export_model_file(args.from_model, name=args.model, repository=args.repository,
                                      feature_names=names, holdout=holdout, tolerance=args.tolerance)
    else:
        if not args.data or not args.label:
            raise ValueError("--data and --label are required to train (or give --from-model)")
        table = _read_table(args.data)
        if args.label not in table.column_names:
            raise ValueError(f"label column {args.label!r} is not in the data ({', '.join(table.column_names)})")
        x, names = _feature_matrix(table, args.label, args.features)
        y = table.column(args.label).to_numpy(zero_copy_only=False)
        published = train_xgboost(x, y, name=args.model, repository=args.repository, feature_names=names,
                                  task=args.task, params=dict(args.param), holdout_fraction=args.holdout,
                                  tolerance=args.tolerance)
    return {"model": published.model, "version": published.version, "path": str(published.path),
            "kind": published.manifest.kind, "features": list(published.manifest.feature_names),
            "training": published.manifest.training}


def _run_train_bandit(args: argparse.Namespace) -> dict[str, Any]:
    from model_server.bandits import PolicyConfig
    from model_server.training import init_bandit, latest_manifest, train_bandit_from_lake
    from twofold.lakestore import apply_storage_arguments

    apply_storage_arguments(args)
    arms = [a.strip() for a in args.arms.split(",")] if args.arms else None
    features = [f.strip() for f in args.features.split(",")] if args.features else None
    knobs = {k: getattr(args, k) for k in ("alpha", "epsilon", "scale", "draws", "floor", "ridge", "base")
             if getattr(args, k) is not None}
    current = latest_manifest(args.repository, args.model)
    base: dict[str, Any] = {}
    if current is not None and current.is_policy:
        base = {k: current.training[k] for k in ("policy", "alpha", "epsilon", "scale", "draws", "floor", "ridge",
                                                  "base")
                if k in current.training}
    if args.policy:
        base["policy"] = args.policy
    config = PolicyConfig(**{**base, **knobs})
    if args.init:
        if not arms or not features:
            raise ValueError("--init needs --arms and --features")
        published = init_bandit(repository=args.repository, name=args.model, arms=arms, feature_names=features,
                                config=config)
        return {"model": published.model, "version": published.version, "path": str(published.path),
                "kind": published.manifest.kind, "published": True, "reason": "untrained policy"}
    if not args.reward_event:
        raise ValueError("--reward-event is required to train from the lake (or use --init)")
    result = train_bandit_from_lake(
        args.lake, repository=args.repository, name=args.model, reward_event=args.reward_event,
        window=args.window, reward=args.reward, config=config, arm_names=arms, feature_names=features,
        holdout_fraction=args.holdout, gate_rule=args.gate, as_of=args.as_of, since=args.since,
        **{name: value for name, value in (("gate_margin", args.gate_margin), ("gate_confidence", args.gate_confidence),
                                           ("gate_min_ess", args.min_ess)) if value is not None})
    out: dict[str, Any] = {"model": args.model, "published": result.published is not None,
                           "reason": result.reason, "rows_train": result.rows_train,
                           "rows_evaluated": result.rows_evaluated, "rows_dropped": result.rows_dropped,
                           "evaluation": result.report.to_dict() if result.report else None,
                           "gate": result.gate.to_dict() if result.gate else None}
    if result.published is not None:
        out.update(version=result.published.version, path=str(result.published.path),
                   kind=result.published.manifest.kind)
    return out


def _run_train(args: argparse.Namespace) -> int:
    """Print the outcome as JSON; exit 0 when published, 3 when the gate refused, 2 on bad input."""
    from twofold.logs import configure_logging

    configure_logging(args.log_level, "text")
    try:
        out = _run_train_xgboost(args) if args.trainer == "xgboost" else _run_train_bandit(args)
    except ModuleNotFoundError as exc:
        print(f"twofold train: needs the `train` extra (pip install 'twofold[train]'): {exc}", file=sys.stderr)
        return 2
    except (ValueError, LookupError, FileNotFoundError, RuntimeError) as exc:
        print(f"twofold train {args.trainer}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2, default=str))
    return 0 if out.get("published", True) else 3


TRAIN = Command(configure=_configure_train, run=_run_train)
