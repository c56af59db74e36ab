"""`twofold example`: the inputs the README's "Running the pieces" needs, from the demo's world.

`twofold example data` writes the training data the ranker learns from (`users.parquet`: an
exploration log of the demo's synthetic users, the theme shown as one-hot columns and whether
the user converted). `twofold example traffic` sends simulated users through the SDK to running
servers, on the example flag `home-ranking` (examples/flags) with the events the example
experiment measures (examples/experiments/home-ranking.yaml), and waits until its exposures
and events are readable in the lake, so `twofold analyze` right after it has results.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

from twofold.cli import Command

DEV_SECRET = "twofold-local-dev-secret"  # the compiler's development client (docs/assignment.md)
FLAG = "home-ranking"


def _configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    data = sub.add_parser("data", help="write the ranker's training data (users.parquet)")
    data.add_argument("--out", default="data/example", help="folder to write users.parquet into")
    data.add_argument("--rows", type=int, default=20_000, help="logged visits")
    data.add_argument("--seed", type=int, default=7, help="seed of the synthetic world")
    traffic = sub.add_parser("traffic", help="send simulated users through the SDK to running servers")
    traffic.add_argument("--assignment", default="127.0.0.1:50051", help="assignment server address")
    traffic.add_argument("--model", default="127.0.0.1:50052", help="model server address")
    traffic.add_argument("--secret", default=DEV_SECRET, help="client secret")
    traffic.add_argument("--users", type=int, default=2000, help="simulated users")
    traffic.add_argument("--lake", default="data/lake",
                         help="the servers' lake: wait until this run's records are readable there")
    traffic.add_argument("--seed", type=int, default=11, help="seed of the simulated users")
    traffic.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the servers and the lake")


def write_training_data(out: Path, rows: int, seed: int) -> Path:
    """users.parquet: user features, the theme shown (one-hot) and `converted` (the label)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from twofold.demo import world

    logged = world.logged_interactions(rows, seed)
    matrix = world.ranker_rows(logged.x, logged.themes)
    names = [*world.FEATURES, *(f"theme_{t}" for t in world.THEMES)]
    columns = {name: matrix[:, i] for i, name in enumerate(names)}
    columns["converted"] = logged.converted
    out.mkdir(parents=True, exist_ok=True)
    path = out / "users.parquet"
    pq.write_table(pa.table(columns), path)
    return path


def _wait_serving(target: str, what: str, seconds: float) -> None:
    """Block until `target` answers grpc.health.v1 SERVING; SystemExit naming it otherwise."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + seconds
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"twofold example traffic: the {what} server at {target} is not serving "
                                 f"after {seconds:.0f}s (start it first: see README, Running the pieces)")
            time.sleep(0.2)


def _lake_has(lake: Path, prefix: str, exposures: int, events: int) -> bool:
    import pyarrow.compute as pc

    from twofold.lake import read_table

    found = []
    for table in ("exposures", "events"):
        units = read_table(lake, table).column("unit")
        found.append(pc.sum(pc.starts_with(units, prefix)).as_py() or 0)
    return found[0] >= exposures and found[1] >= events


def send_traffic(args: argparse.Namespace) -> int:
    """Simulated visits: decide(), then the visit's events, as a backend service would call them."""
    import numpy as np

    from client_sdk import Client, ClientOptions
    from twofold.demo import world
    from twofold.demo.simulate import shown_theme

    _wait_serving(args.assignment, "assignment", args.wait)
    _wait_serving(args.model, "model", args.wait)
    rng = np.random.default_rng(args.seed)
    x = world.sample_users(args.users, rng)
    p = world.conversion_probability(x)
    prefix = f"user-{uuid.uuid4().hex[:8]}-"
    systems: dict[str, int] = {}
    with Client(args.assignment, args.model, client_secret=args.secret,
                options=ClientOptions(flush_at_exit=False)) as client:
        for i in range(args.users):
            unit = f"{prefix}{i}"
            country = world.COUNTRIES[i % len(world.COUNTRIES)]
            decision = client.decide(FLAG, unit, {"country": country, "platform": "web"}, features=x[i],
                                     candidates=world.candidates(),
                                     default={"system": "static", "theme": world.STATIC_THEME})
            key = f"{decision.variant or 'none'}/{decision.reason.value}"
            systems[key] = systems.get(key, 0) + 1
            client.track("session_start", unit)
            client.track("page_load", unit, float(round(rng.gamma(4.0, 60.0), 1)))
            for _ in range(int(rng.poisson(1.5))):
                client.track("click", unit)
            if rng.uniform() < p[i, shown_theme(decision)]:
                client.track("purchase", unit, float(round(rng.uniform(20.0, 60.0), 2)))
            if rng.uniform() < 0.01:
                client.track("crash", unit)
        client.flush()
        stats = client.stats
    print(f"{args.users} users: " + ", ".join(f"{k}={v}" for k, v in sorted(systems.items())))
    print(f"exposures sent {stats.exposures_sent}, events sent {stats.events_sent}, "
          f"fallbacks {stats.fallbacks_served}, resolve failures {stats.resolve_failures}")
    lake = Path(args.lake)
    deadline = time.monotonic() + args.wait
    while not _lake_has(lake, prefix, stats.exposures_sent, stats.events_sent):
        if time.monotonic() > deadline:
            print(f"twofold example traffic: this run's records are not readable in {lake} after {args.wait:.0f}s "
                  "(is --lake the servers' lake?)", file=sys.stderr)
            return 1
        time.sleep(0.5)
    print(f"all in the lake at {lake}")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.what == "data":
        path = write_training_data(Path(args.out), args.rows, args.seed)
        print(f"wrote {path} ({args.rows} rows; label column: converted)")
        return 0
    return send_traffic(args)


EXAMPLE = Command(configure=_configure, run=_run)
