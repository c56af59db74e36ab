"""`twofold analyze`, `twofold stats` and `twofold serve-analysis`.

Exit codes: 0 results computed; 1 the analysis ran but could not produce results (the document
says why: no exposures, missing table, ...); 2 the input itself is invalid (bad YAML or JSON).
Problems go to stderr as one clear line, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from twofold.cli import Command
from twofold.lakestore import add_storage_arguments, apply_storage_arguments
from twofold.server import ServerSettings, ServiceSetup, run_service
from twofold.settings import add_server_arguments, env_default

log = logging.getLogger("twofold.analysis")

if TYPE_CHECKING:
    from analysis_worker.engine import Engine

DEFAULT_PORT = 50053
# The results web UI listens on the gRPC port + 2000 by default (metrics use + 1000).
HTTP_PORT_OFFSET = 2000


def _err(message: str) -> None:
    print(f"twofold: {message}", file=sys.stderr)


# ---------------------------------------------------------------- engines

def _spark_setting(value: str) -> tuple[str, str]:
    key, sep, setting = value.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, e.g. spark.driver.memory=4g; got {value!r}")
    return key.strip(), setting.strip()


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=["duckdb", "spark"], default=env_default("analysis_engine", "duckdb"),
                        help="what runs the metric SQL: DuckDB in this process, or Spark (pip install "
                             "'twofold[spark]') [TWOFOLD_ANALYSIS_ENGINE, default duckdb]")
    parser.add_argument("--spark-master", default=env_default("spark_master", None),
                        help="with --engine spark: local[*] (default), spark://host:7077, yarn, k8s://..., or a "
                             "Spark Connect URL sc://host:15002 [TWOFOLD_SPARK_MASTER]")
    parser.add_argument("--spark-conf", type=_spark_setting, action="append", default=[], metavar="KEY=VALUE",
                        help="with --engine spark: a Spark setting, repeatable (e.g. spark.driver.memory=4g)")


def _engine(args: argparse.Namespace) -> Engine:
    """The engine the flags ask for; ValueError (one line) for flags of the other engine."""
    from analysis_worker.engine import make_engine

    return make_engine(args.engine, threads=args.threads, memory_limit=args.memory_limit,
                       spark_master=args.spark_master, spark_conf=dict(args.spark_conf) or None)


# ---------------------------------------------------------------- analyze

def _configure_analyze(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", help="experiment definition (YAML)")
    parser.add_argument("--lake", default=env_default("lake", "data/lake"),
                        help="lake folder or URL, e.g. s3://bucket/lake (contract 3) [TWOFOLD_LAKE, default data/lake]")
    add_storage_arguments(parser)
    parser.add_argument("--out", default="results",
                        help="folder for <experiment>.json and <experiment>.html (default ./results)")
    parser.add_argument("--format", choices=["table", "json"], default="table", help="what to print on stdout")
    parser.add_argument("--sql", choices=["duckdb", "spark", "bigquery", "trino"],
                        help="print the sufficient-statistics SQL in this dialect and exit")
    parser.add_argument("--threads", type=int, default=None,
                        help="DuckDB threads (default: the cores DuckDB sees, plus one)")
    parser.add_argument("--memory-limit", default=env_default("analysis_memory_limit", None),
                        help="DuckDB memory limit, e.g. 3GB; beyond it DuckDB spills to disk "
                             "[TWOFOLD_ANALYSIS_MEMORY_LIMIT, default 80%% of RAM]")
    _add_engine_arguments(parser)


def _run_analyze(args: argparse.Namespace) -> int:
    apply_storage_arguments(args)
    from analysis_worker.analyze import analyze
    from analysis_worker.config import ConfigError, load_experiment
    from analysis_worker.report import render_table
    from analysis_worker.sql import DialectError, build_query, transpile

    try:
        config = load_experiment(args.experiment)
    except ConfigError as exc:
        _err(str(exc))
        return 2
    if args.sql:
        try:
            print(transpile(build_query(config), args.sql))
        except DialectError as exc:
            _err(f"{config.name}: {exc}")
            return 2
        return 0
    try:
        engine = _engine(args)
    except ValueError as exc:
        _err(str(exc))
        return 2
    try:
        result = analyze(config, args.lake, engine=engine)
    except Exception as exc:  # a bug, not bad input: still one line, and a non-zero exit
        _err(f"{config.name}: internal error ({type(exc).__name__}: {exc})")
        return 1
    finally:
        engine.close()
    try:
        json_path, html_path = result.write(args.out)
    except OSError as exc:
        _err(f"cannot write results to {args.out}: {exc}")
        return 1
    if args.format == "json":
        print(json.dumps(result.document, indent=2))
    else:
        print(render_table(result.document))
        print(f"\nresults: {json_path}\nreport:  {html_path}\n({result.duration_seconds:.2f} s, "
              f"{result.rows_scanned:,} lake rows)")
    if result.error:
        _err(f"{config.name}: {result.error}")
        return 1
    return 0


ANALYZE = Command(configure=_configure_analyze, run=_run_analyze)


# ---------------------------------------------------------------- stats

def _configure_stats(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="sufficient statistics as JSON (see docs/analysis.md), or - for stdin")
    parser.add_argument("--html", help="also write the HTML report here")
    parser.add_argument("--table", action="store_true", help="print the terminal table instead of JSON")


def _run_stats(args: argparse.Namespace) -> int:
    from analysis_worker.compute import compute_results
    from analysis_worker.inputs import InputError, parse_input
    from analysis_worker.report import render_html, render_table

    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    except OSError as exc:
        _err(f"cannot read {args.file}: {exc.strerror or exc}")
        return 2
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        _err(f"{args.file}: not valid JSON ({exc})")
        return 2
    try:
        inp = parse_input(raw)
    except InputError as exc:
        _err(f"{args.file}: {exc}")
        return 2
    document = compute_results(inp)
    print(render_table(document) if args.table else json.dumps(document, indent=2))
    if args.html:
        Path(args.html).write_text(render_html(document))
    return 0


STATS = Command(configure=_configure_stats, run=_run_stats)


# ---------------------------------------------------------------- serve-analysis

def parse_every(value: str) -> float:
    """'15m', '1h', '30s' or seconds -> seconds (argparse type)."""
    from analysis_worker.config import ConfigError, parse_duration

    try:
        return float(parse_duration(float(value) if value.replace(".", "", 1).isdigit() else value, "--every"))
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _configure_serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiments", nargs="+", default=[env_default("experiments", "experiments")],
                        help="experiment YAML files or folders of them [TWOFOLD_EXPERIMENTS]")
    parser.add_argument("--lake", default=env_default("lake", "data/lake"),
                        help="lake folder or URL (s3://bucket/lake) [TWOFOLD_LAKE]")
    add_storage_arguments(parser)
    parser.add_argument("--every", type=parse_every, default=parse_every(env_default("every", "15m") or "15m"),
                        help="recompute every experiment this often, e.g. 15m, 1h [TWOFOLD_EVERY]")
    parser.add_argument("--out", default=env_default("results_dir", None),
                        help="also write <experiment>.json/.html here after each computation [TWOFOLD_RESULTS_DIR]")
    parser.add_argument("--threads", type=int, default=None,
                        help="DuckDB threads (default: the cores DuckDB sees, plus one)")
    parser.add_argument("--memory-limit", default=env_default("analysis_memory_limit", None),
                        help="DuckDB memory limit, e.g. 3GB [TWOFOLD_ANALYSIS_MEMORY_LIMIT]")
    parser.add_argument("--http-host", default=env_default("http_host", "0.0.0.0"),
                        help="results web UI bind address [TWOFOLD_HTTP_HOST, default 0.0.0.0]")
    parser.add_argument("--http-port", type=int, default=None,
                        help="results web UI port, 0 for any free port, -1 to turn it off [TWOFOLD_HTTP_PORT, "
                             f"default the gRPC port + {HTTP_PORT_OFFSET} ({DEFAULT_PORT + HTTP_PORT_OFFSET}), "
                             "or any free port when --port is 0]")
    _add_engine_arguments(parser)
    add_server_arguments(parser, default_port=DEFAULT_PORT)


def _run_serve(args: argparse.Namespace) -> int:
    apply_storage_arguments(args)
    from analysis_worker.service import AnalysisWorker, registration
    from analysis_worker.web import ResultsWebServer
    from twofold.server import RunningServer
    from twofold.watched_files import WatchedFiles, load_secrets

    if args.http_port is None:
        env = env_default("http_port", None)
        # Follows the gRPC port, so a server on a free port (tests, the demo) never collides on a fixed one.
        args.http_port = int(env) if env else (args.port + HTTP_PORT_OFFSET if 0 < args.port <= 65535 - HTTP_PORT_OFFSET
                                               else 0)
    if not -1 <= args.http_port <= 65535:
        _err(f"--http-port must be within -1..65535, got {args.http_port}")
        return 2
    missing = [p for p in args.experiments if not Path(p).exists()]
    if missing:
        _err(f"--experiments {' '.join(missing)}: no such file or folder (experiment YAML files or folders "
             "of them; examples/experiments/ holds one)")
        return 2
    try:
        engine = _engine(args)
    except ValueError as exc:
        _err(str(exc))
        return 2

    async def setup(settings: ServerSettings) -> ServiceSetup:
        worker = AnalysisWorker(args.experiments, args.lake, every_seconds=args.every, out_dir=args.out,
                                engine=engine)
        web = None
        if args.http_port >= 0:
            try:
                # The gRPC API's client secrets (`--client-secrets-file`), re-read when the file changes.
                secrets = None if settings.client_secrets_file is None else WatchedFiles(
                    [settings.client_secrets_file], load_secrets, what="client secrets").current
                web = ResultsWebServer(worker, args.http_host, args.http_port, tls=settings.tls, secrets=secrets)
            except OSError as exc:  # the results still serve over gRPC; the log says why the pages do not
                log.error("results web UI not started", extra={"fields": {
                    "host": args.http_host, "port": args.http_port, "error": str(exc)}})

        async def on_started(running: RunningServer) -> None:
            if web is not None:
                web.start()
                running.extra_ports["http_port"] = web.port
            worker.start()

        async def on_stop() -> None:
            if web is not None:
                web.stop()
            await worker.stop()

        return ServiceSetup(services=[registration(worker)], on_started=on_started, on_stop=on_stop)

    return run_service(args, setup)


SERVE = Command(configure=_configure_serve, run=_run_serve)
