"""`twofold demo`: train, serve, experiment, analyze, and check the analysis against the truth.

1. Train an XGBoost ranker and a LinUCB bandit on an exploration log of synthetic users whose
   conversion probabilities are known (twofold.demo.world), and publish both to a model
   repository with the model server's Python API.
2. Start the assignment, model and analysis servers as child processes on free local ports,
   with a local lake folder.
3. Simulate users through the SDK: `decide()` on the `home-ranking` flag, whose arms are the
   static experience, the ranker and the bandit; then `track()` conversions and bounces.
4. Stop the serving processes (they drain and flush their write-ahead logs into Parquet), run
   the analysis with the analysis worker's Python API, print the results table, write the
   HTML report, and say whether the analysis recovered the known effects.

Every process the demo starts is stopped at the end, on errors and on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import datetime as dt
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from twofold.demo import experiment, world
from twofold.demo.processes import InterruptGuard, ServerGroup, ServerProcess, say_on_stderr
from twofold.demo.progress import Progress
from twofold.demo.simulate import Visit, draw_outcomes, track_outcomes, visit_all
from twofold.demo.train import TrainedSystems, Truth, train_systems, true_rates
from twofold.lakestore import LakeStoreError, add_storage_arguments, apply_storage_arguments, open_store

# Marks a lake prefix as the demo's own, so a later run may clear it (and nothing else).
DEMO_MARKER = "_twofold_demo"

# Sub-folders the demo owns inside its folder (cleared at the start of a run).
OWNED = ("flags", "repository", "lake", "wal", "experiments", "results", "logs", "materializations.sqlite",
         "token.key", "served-allocations.json")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default="data/demo",
                        help="working folder: flags, model repository, lake, reports (default ./data/demo)")
    parser.add_argument("--temp", action="store_true", help="work in a temporary folder, removed at the end")
    parser.add_argument("--users", type=int, default=9000, help="simulated users (default 9000)")
    parser.add_argument("--train-rows", type=int, default=20_000,
                        help="rows of the exploration log both systems learn from (default 20000)")
    parser.add_argument("--concurrency", type=int, default=16, help="decide() calls in flight (default 16)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the synthetic world (default 7)")
    parser.add_argument("--local-evaluation", action="store_true",
                        help="resolve flags in process from the assignment server's state stream")
    parser.add_argument("--no-progress", action="store_true", help="plain log lines instead of progress bars")
    parser.add_argument("--serve", action="store_true",
                        help="at the end, keep the analysis server and its results web UI up until Ctrl-C")
    parser.add_argument("--lake", default=None,
                        help="lake URL, e.g. s3://bucket/prefix (default: a folder inside --dir); the write-ahead "
                             "logs stay in --dir. The demo clears a prefix it used before and refuses one "
                             "holding other data")
    add_storage_arguments(parser)


def _say(message: str) -> None:
    print(message, flush=True)


class Step:
    """Prints `==> label` and, on exit, how long it took."""

    def __init__(self, label: str) -> None:
        self.label = label

    def __enter__(self) -> Step:
        self.started = time.monotonic()
        _say(f"==> {self.label}")
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            _say(f"    done in {time.monotonic() - self.started:.1f}s")


def _prepare(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for name in OWNED:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    paths = {name: folder / name for name in ("flags", "repository", "lake", "experiments", "results", "logs")}
    for path in paths.values():
        path.mkdir(parents=True)
    key = folder / "token.key"
    key.write_text(base64.b64encode(os.urandom(32)).decode())
    paths["token_key"] = key
    paths["materializations"] = folder / "materializations.sqlite"
    paths["wal"] = folder / "wal"
    return paths


def use_lake_url(url: str, paths: dict[str, Any]) -> None:
    """Make the demo write to and read from the lake at `url` (its logs stay local, in `wal/`).

    A prefix the demo wrote before (it leaves a marker) is cleared so that results are this run's;
    a prefix with other data is refused: the demo never deletes a lake it did not create.
    """
    store = open_store(url)
    existing = [f for f in store.list_files("", suffix="") if not f.path.startswith("_probe/")]
    if existing:
        if not store.exists(DEMO_MARKER):
            raise ValueError(f"the lake {url} already holds data the demo did not write; give an empty prefix")
        for f in existing:
            store.delete(f.path)
    store.publish(DEMO_MARKER, b"written by twofold demo\n")
    paths["lake"] = url


def _start_servers(group: ServerGroup, paths: dict[str, Path]) -> dict[str, ServerProcess]:
    """Start the three servers concurrently (each loads its own state) and wait until all serve."""
    commands = {
        "assignment": ["serve-assignment", "--flags", str(paths["flags"]), "--lake", str(paths["lake"]),
                       "--wal-dir", str(paths["wal"]), "--token-key-file", str(paths["token_key"]),
                       "--materializations", str(paths["materializations"]), "--log-format", "text"],
        "model": ["serve-model", "--repository", str(paths["repository"]), "--lake", str(paths["lake"]),
                  "--wal-dir", str(paths["wal"]), "--log-format", "text"],
        "analysis": ["serve-analysis", "--experiments", str(paths["experiments"]), "--lake", str(paths["lake"]),
                     "--every", "5s", "--out", str(paths["results"] / "served"), "--threads", "1",
                     "--http-host", "127.0.0.1", "--http-port", "0", "--log-format", "text"],
    }
    pool = concurrent.futures.ThreadPoolExecutor(len(commands))
    try:
        futures = {name: pool.submit(group.start, name, args) for name, args in commands.items()}
        return {name: future.result() for name, future in futures.items()}
    finally:
        # On Ctrl-C, do not wait for start-ups to finish: the group already knows every process
        # spawned so far (registered before readiness) and the caller stops them all.
        pool.shutdown(wait=False, cancel_futures=True)


def _decision_id(seed: int, unit: str) -> str:
    """A reproducible decision id per user: the bandit's choice replays run after run."""
    return hashlib.sha256(f"demo-{seed}-{unit}".encode()).hexdigest()[:32]


async def _simulate(servers: dict[str, ServerProcess], users: np.ndarray, args: argparse.Namespace,
                    progress: bool) -> tuple[list[Visit], int, dict[str, int]]:
    from client_sdk import AsyncClient, ClientOptions, Deadlines

    units = [f"user-{i:06d}" for i in range(len(users))]
    rng = np.random.default_rng(args.seed + 1)
    countries = [world.COUNTRIES[i] for i in rng.integers(0, len(world.COUNTRIES), len(users))]
    # A web service would keep the SDK's default deadlines (a few hundred ms: serve the default
    # rather than keep a page waiting). The demo is a batch simulation on a machine that also
    # runs the three servers; generous deadlines keep a CPU hiccup from dropping users out of
    # the experiment (they would get the static default, unexposed).
    options = ClientOptions(local_evaluation=args.local_evaluation, flush_interval=0.5,
                            deadlines=Deadlines(resolve=5.0, model=5.0, apply=10.0, track=10.0))
    async with AsyncClient(servers["assignment"].target, servers["model"].target, experiment.CLIENT_SECRET,
                           options=options) as client:
        if args.local_evaluation and not await client.wait_for_state(10):
            raise RuntimeError("no state from the assignment server's stream within 10 s")
        with Progress("visits (decide)", len(units), enabled=progress) as bar:
            visits = await visit_all(client, experiment.FLAG, units, users, countries,
                                     concurrency=args.concurrency, progress=bar,
                                     decision_ids=[_decision_id(args.seed, u) for u in units])
        # The visits' exposures reach the server before any outcome exists: a conversion
        # happens after the page view, and the lake's timestamps must say so.
        await client.flush()
        outcomes = draw_outcomes(visits, users, args.seed + 2)
        events = track_outcomes(client, visits, outcomes)
        if not await client.flush():
            raise RuntimeError("could not deliver every exposure and event to the assignment server")
        stats = client.stats
        counters = {"exposures": stats.exposures_sent, "events": stats.events_sent,
                    "fallbacks": stats.fallbacks_served, "resolve failures": stats.resolve_failures}
    return visits, events, counters


def _summary(visits: list[Visit]) -> str:
    by_variant = Counter(v.variant for v in visits)
    reasons = Counter(v.reason.value for v in visits)
    shown = Counter((v.variant, world.THEMES[v.theme]) for v in visits)
    lines = ["    units per arm: " + ", ".join(f"{k}={by_variant[k]}" for k in experiment.ARMS),
             "    reasons: " + ", ".join(f"{k}={n}" for k, n in sorted(reasons.items()))]
    for arm in experiment.ARMS:
        total = max(1, by_variant[arm])
        lines.append(f"    {arm:<7} showed: " + ", ".join(
            f"{t} {shown[(arm, t)] / total:.0%}" for t in world.THEMES))
    return "\n".join(lines)


def _served_results(server: ServerProcess, document: dict[str, Any], since: dt.datetime,
                    timeout: float = 30.0) -> tuple[bool, str]:
    """Wait for the analysis server's scheduled computation over the complete lake (GetResults)
    and compare its units per variant with the document the Python API computed."""
    import grpc

    from protos.twofold.analysis.v1 import analysis_pb2, analysis_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(server.target) as channel:
        stub = analysis_pb2_grpc.AnalysisServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.GetResults(analysis_pb2.GetResultsRequest(experiment=experiment.FLAG), timeout=5)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    return False, f"GetResults failed: {exc.code().name}: {exc.details()}"
            else:
                if reply.computed_at.ToDatetime(dt.UTC) > since:
                    served = json.loads(reply.results_json)
                    same = served.get("units") == document.get("units")
                    return same, (f"GetResults at {server.target} serves the same units per variant"
                                  if same else f"GetResults units {served.get('units')} != {document.get('units')}")
            time.sleep(0.5)
    return False, f"no computation over the complete lake within {timeout:.0f}s"


def _bandit_log(lake: str | Path, visits: list[Visit]) -> tuple[int, int, float, float]:
    """(bandit units, their decisions in the lake, min and max logged propensity)."""
    from twofold.lake import read_table

    decisions = read_table(lake, "decisions")
    ids = {v.decision_id for v in visits if v.variant == "bandit" and v.decision_id}
    logged = [row for row in decisions.to_pylist() if row["decision_id"] in ids]
    props = [row["propensity"] for row in logged] or [float("nan")]
    return len(ids), len(logged), float(min(props)), float(max(props))


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:
        return True


def run(args: argparse.Namespace) -> int:
    if args.users < 300:
        print("twofold demo: --users must be at least 300", file=sys.stderr)
        return 2
    missing = [m for m in ("xgboost", "onnxmltools", "twofold.resolver", "model_server.bandits",
                           "analysis_worker.analyze") if _missing(m)]
    if missing:
        print(f"twofold demo: missing {', '.join(missing)}; the demo needs the three services and the "
              "training tools (pip install 'twofold[demo]')", file=sys.stderr)
        return 2
    started = time.monotonic()
    temp = tempfile.mkdtemp(prefix="twofold-demo-") if args.temp else None
    folder = Path(temp or args.dir).resolve()
    progress = not args.no_progress
    paths = _prepare(folder)
    apply_storage_arguments(args)  # the servers it starts inherit the AWS_* environment
    if args.lake:
        try:
            use_lake_url(args.lake, paths)
        except (ValueError, OSError, LakeStoreError) as exc:
            print(f"twofold demo: {exc}", file=sys.stderr)
            return 2
    group = ServerGroup(paths["logs"])
    guard = InterruptGuard()
    with guard:  # also around the cleanup: a second Ctrl-C must not leave servers behind
        interrupted = False
        try:
            return _run(args, folder, paths, group, progress, started, temp=bool(temp), guard=guard)
        except KeyboardInterrupt:
            interrupted = True
            return 130
        finally:
            guard.stopping = True
            group.stop_all()
            if temp:
                shutil.rmtree(temp, ignore_errors=True)
            if interrupted:
                say_on_stderr("interrupted: every server the demo started is stopped"
                              + (", its temporary folder removed" if temp else ""))


def _run(args: argparse.Namespace, folder: Path, paths: dict[str, Path], group: ServerGroup,
         progress: bool, started: float, *, temp: bool, guard: InterruptGuard) -> int:
    _say(f"Twofold demo in {folder}")
    with Step(f"training the XGBoost ranker and the LinUCB bandit on {args.train_rows} logged visits"):
        trained: TrainedSystems = train_systems(paths["repository"], rows=args.train_rows, seed=args.seed)
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in trained.ranker_metrics.items())
        value, lower, upper = trained.bandit_snips
        _say(f"    {trained.ranker.model} v{trained.ranker.version} ({metrics})")
        _say(f"    {trained.bandit.model} v{trained.bandit.version}: off-policy estimate (SNIPS) of its conversion "
             f"{value:.2%} [{lower:.2%}, {upper:.2%}] vs {trained.logged_rate:.2%} logged")
    with Step("computing the ground truth (Monte Carlo over 200k users, through the exported ONNX graphs)"):
        truth: Truth = true_rates(trained)
        _say("    true conversion: " + ", ".join(f"{k} {v:.2%}" for k, v in truth.rates.items()))

    run_start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    (paths["flags"] / "home-ranking.yaml").write_text(experiment.flags_yaml())
    (paths["experiments"] / "home-ranking.yaml").write_text(
        yaml.safe_dump(experiment.experiment_config(run_start), sort_keys=False))
    with Step("starting the assignment, model and analysis servers"):
        servers = _start_servers(group, paths)
        for name, server in servers.items():
            _say(f"    {name:<10} {server.target}  metrics :{server.metrics_port}  pid {server.pid}")

    users = world.sample_users(args.users, np.random.default_rng(args.seed))
    with Step(f"simulating {args.users} users through the SDK "
              f"({'local' if args.local_evaluation else 'remote'} evaluation, {args.concurrency} in flight)"):
        sim_started = time.monotonic()
        visits, events, counters = guard.run_async(_simulate(servers, users, args, progress))
        rate = len(visits) / max(1e-9, time.monotonic() - sim_started)
        _say(f"    {len(visits)} decisions ({rate:.0f}/s), {events} events; "
             + ", ".join(f"{k} {v}" for k, v in counters.items()))
        _say(_summary(visits))

    with Step("stopping the assignment and model servers (drain, write-ahead log to Parquet)"):
        for name in ("assignment", "model"):
            code = group.stop(name)
            if code != 0:
                raise RuntimeError(f"{name} server exited with code {code}; see {paths['logs'] / (name + '.log')}")

    lake_complete = dt.datetime.now(dt.UTC)
    (paths["results"] / "truth.json").write_text(json.dumps(
        {"conversion_rate": truth.rates, "effects": {f"{m}/{a}": v for (m, a), v in
                                                      experiment.true_effects(truth).items()}}, indent=1) + "\n")
    with Step("analyzing the experiment (analysis worker, DuckDB on the lake)"):
        from analysis_worker.analyze import analyze
        from analysis_worker.report import render_table

        config = experiment.experiment_config(run_start, dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1))
        analysis = analyze(config, paths["lake"])
        json_path, html_path = analysis.write(paths["results"])
    _say("")
    _say(render_table(analysis.document))
    _say("")
    recovery = experiment.check_recovery(analysis.document, truth)
    _say(experiment.format_recovery(recovery, truth))
    served_ok, served_note = _served_results(servers["analysis"], analysis.document, lake_complete)
    _say(f"  analysis server: {served_note}")
    if not served_ok:
        recovery.problems.append(f"the analysis server disagrees with the Python API: {served_note}")
    bandit_units, logged, p_min, p_max = _bandit_log(paths["lake"], visits)
    _say(f"  bandit decision log: {logged} of {bandit_units} bandit decisions in the lake, "
         f"propensities in [{p_min:.3f}, {p_max:.3f}]")
    if temp:
        _say("(--temp: the folder and its report are removed on exit; use --dir to keep them)")
    if logged != bandit_units or not 0 < p_min <= p_max <= 1:
        recovery.problems.append("the bandit's decisions are not all logged with propensities in (0, 1]")
    _say("")
    _say(f"Results: {json_path}")
    _say(f"Report:  {html_path}")
    _say(f"Servers' logs: {paths['logs']}")
    web = servers["analysis"].http_port
    if web:
        _say(f"Results web UI: http://127.0.0.1:{web}/  (this experiment: "
             f"http://127.0.0.1:{web}/experiments/{analysis.experiment})")
    elapsed = time.monotonic() - started
    code = _verdict(recovery, elapsed)
    if args.serve and web:
        _say("Serving the results until Ctrl-C ...")
        try:
            while servers["analysis"].alive():
                time.sleep(0.5)
            _say("the analysis server exited; see its log")
        except KeyboardInterrupt:
            _say("\nstopping")
    return code


def _verdict(recovery: experiment.Recovery, elapsed: float) -> int:
    """Print whether the analysis recovered the known effects; the exit code."""
    if recovery.recovered:
        covered = sum(c.covered for c in recovery.checks)
        _say(f"RECOVERED: the analysis found the known effects: both personalized systems' true conversion "
             f"lifts inside their intervals and detected, no sample-ratio mismatch ({covered} of "
             f"{len(recovery.checks)} intervals cover the truth). Total {elapsed:.0f}s.")
        return 0
    _say("NOT RECOVERED:\n  " + "\n  ".join(recovery.problems) + f"\nTotal {elapsed:.0f}s.")
    return 1
