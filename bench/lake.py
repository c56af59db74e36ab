"""Lake benchmarks (issue 15): durable ingest to a local lake and to S3, what bounds it, and query
time against file count before and after compaction. Figures are printed with ratios against
baselines measured in the same run.

(a) Durable TrackEvents ingest (batches of 100 events, acknowledged once the write-ahead log is
    fsynced) into an assignment server whose lake is a local folder, then one whose lake is an S3
    bucket on a local S3 API server (moto's, on loopback): events/s at 1 and 8 calls in flight, and
    the server's CPU per event (/proc).
(b) The floor: the per-event costs measured in this process, one at a time: protobuf parsing of
    a TrackEvents request, the handler's per-event work (checks, dict, properties JSON), the Arrow
    encoding of the write-ahead frame, and the fsync of one group commit; what they leave to
    gRPC and asyncio is the server's measured CPU per event minus their sum.
(c) Query time of one day's partition as many small files, as one file, and after
    `twofold lake compact`: DuckDB (as the analysis worker reads it), median of rounds.

    python -m bench.lake            # full run
    python -m bench.lake --quick    # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import measure, print_table, spawn, stop
from bench.model_server import cpu_seconds

EVENTS_PER_CALL = 100


def _request(batch: int, n: int = EVENTS_PER_CALL) -> object:
    from assignment_server.authoring.compiler import DEFAULT_CLIENT_SECRET
    from protos.twofold.assignment.v1 import assignment_pb2 as pb

    events = [pb.Event(event_id=f"{batch}-{i}", unit=f"user-{i}", name="purchase", value=1.0) for i in range(n)]
    return pb.TrackEventsRequest(client_secret=DEFAULT_CLIENT_SECRET, events=events)


async def _ingest(port: int, pid: int, calls: int) -> list[tuple[int, float, float, float, float]]:
    """(in flight, p50 us, p99 us, events/s, server CPU us per event) at 1 and 8 in flight."""
    import grpc

    from protos.twofold.assignment.v1 import assignment_pb2_grpc as pb_grpc

    out = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.FlagResolverServiceStub(channel)
        counter = 0

        async def track() -> None:
            nonlocal counter
            counter += 1
            await stub.TrackEvents(_request(counter))

        for concurrency in (1, 8):
            cpu0 = cpu_seconds(pid)
            r = await measure("TrackEvents", track, concurrency=concurrency, calls=calls, warmup=20)
            cpu = cpu_seconds(pid) - cpu0
            events = (r.calls + 20) * EVENTS_PER_CALL
            out.append((concurrency, r.p50_us, r.p99_us, r.throughput * EVENTS_PER_CALL, cpu / events * 1e6))
    return out


def bench_ingest(root: Path, quick: bool) -> dict[str, list]:
    from tests.s3_server import running_s3_server

    flags = root / "flags"
    flags.mkdir()
    (flags / "f.yaml").write_text("flag: f\nvariants:\n  a: {system: static}\ndefault: a\nrules: []\n")
    common = ["serve-assignment", "--flags", str(flags), "--materializations", "memory", "--log-level", "error",
              "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1"]
    calls = 150 if quick else 1000
    results: dict[str, list] = {}
    with running_s3_server(root) as s3:
        bucket = s3.new_bucket()
        lakes = {"local folder": (str(root / "lake"), {}),
                 "S3 (local API server)": (f"s3://{bucket}/lake", s3.env)}
        for label, (lake, env) in lakes.items():
            proc, info = spawn([*common, "--lake", lake, "--wal-dir", str(root / "wal" / label.split()[0])], env=env)
            try:
                results[label] = asyncio.run(_ingest(info["port"], proc.pid, calls))
            finally:
                stop(proc)
    return results


def _median_us(fn, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def bench_floor(root: Path, quick: bool) -> dict[str, float]:
    """Per-event microseconds of each step, measured alone in this process."""
    from assignment_server.service import _properties_json
    from protos.twofold.assignment.v1 import assignment_pb2 as pb
    from twofold.lake import LakeWriter

    rounds = 50 if quick else 300
    data = _request(1).SerializeToString()
    parse = _median_us(lambda: pb.TrackEventsRequest.FromString(data), rounds) / EVENTS_PER_CALL
    request = pb.TrackEventsRequest.FromString(data)

    def handler_loop() -> list[dict]:
        # The per-event work of FlagResolverServicer.TrackEvents, as written there.
        records, seen = [], set()
        for e in request.events:
            for name in ("event_id", "unit", "name"):
                text = getattr(e, name)
                if not text or len(text) > 256:
                    raise ValueError
            if e.HasField("value") and (e.value != e.value or abs(e.value) == float("inf")):
                raise ValueError
            if e.event_id in seen:
                continue
            seen.add(e.event_id)
            records.append({"event_id": e.event_id, "ts": 1_790_000_000_000_000, "unit": e.unit, "name": e.name,
                            "value": e.value if e.HasField("value") else None,
                            "properties": _properties_json(e.properties)})
        return records

    handler = _median_us(handler_loop, rounds) / EVENTS_PER_CALL
    records = handler_loop()
    writer = LakeWriter(root / "floor-lake", "events", writer_id="floor")
    frame = writer._frame(records)
    for batch in (100, 800):  # one call's events; 8 calls sharing one group commit
        many = records * (batch // EVENTS_PER_CALL)
        cost = _median_us(lambda many=many: writer._frame(many), rounds) / batch
        if batch == 100:
            encode_100 = cost
        else:
            encode_800 = cost
    fd = os.open(root / "fsync-probe", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fsync = _median_us(lambda: (os.write(fd, frame), os.fdatasync(fd)), 30 if quick else 200)
    finally:
        os.close(fd)
    return {"parse": parse, "handler": handler, "encode_100": encode_100, "encode_800": encode_800,
            "fsync_commit": fsync}


def bench_compaction(root: Path, quick: bool) -> list[tuple]:
    """One day of one table as `files` small files vs one file vs compacted: DuckDB query time."""
    import numpy as np
    import pyarrow as pa

    from analysis_worker.lake import open_lake
    from twofold.lake import TABLE_SCHEMAS, write_parquet
    from twofold.lake_compact import compact

    rows = 200_000 if quick else 400_000
    files = 1_000 if quick else 4_000
    rng = np.random.default_rng(5)
    day = int(dt.datetime(2026, 11, 2, tzinfo=dt.UTC).timestamp() * 1_000_000)
    table = pa.table({
        "event_id": pa.array([f"e{i}" for i in range(rows)]),
        "ts": pa.array(day + np.sort(rng.integers(0, 86_400_000_000, rows)), pa.timestamp("us", tz="UTC")),
        "unit": pa.array([f"user-{u}" for u in rng.integers(0, rows // 4, rows)]),
        "name": pa.array(rng.choice(["purchase", "click", "session_start"], rows)),
        "value": pa.array(rng.exponential(20.0, rows)),
        "properties": pa.array(["{}"] * rows),
    }, schema=TABLE_SCHEMAS["events"])
    layouts = {"one file": 1, f"{files} small files": files}
    lakes = {}
    for label, count in layouts.items():
        lake = root / label.replace(" ", "-")
        folder = lake / "events" / "date=2026-11-02"
        folder.mkdir(parents=True)
        bounds = np.linspace(0, rows, count + 1).astype(int)
        for k in range(count):
            write_parquet(table.slice(bounds[k], bounds[k + 1] - bounds[k]), folder / f"w-{k:06d}.parquet", "events")
        lakes[label] = lake
    query = ("SELECT name, count(*) AS n, count(DISTINCT unit) AS units, sum(value) AS total FROM "
             "(SELECT * FROM events QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY ts) = 1) "
             "GROUP BY name ORDER BY name")

    def timed(lake: Path) -> tuple[float, list]:
        samples, answer = [], None
        for _ in range(3):
            t0 = time.perf_counter()
            tables = open_lake(lake)
            answer = tables.connection.execute(query).fetchall()
            tables.connection.close()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples), answer

    def same(answer: list, reference: list) -> bool:
        """Equal counts, sums equal up to the order of floating-point addition."""
        return all(a[:3] == b[:3] and abs(a[3] - b[3]) <= 1e-9 * abs(b[3]) for a, b in zip(answer, reference,
                                                                                          strict=True))

    out = []
    base, reference = timed(lakes["one file"])
    out.append(("one file", 1, base, 1.0))
    small = lakes[f"{files} small files"]
    seconds, answer = timed(small)
    assert same(answer, reference)
    out.append((f"{files} small files", files, seconds, seconds / base))
    t0 = time.perf_counter()
    report = compact(small, ["events"], older_than=dt.timedelta(0))
    took = time.perf_counter() - t0
    # Compacted against one file, interleaved round by round (a shared machine's load drifts).
    rounds: dict[Path, list[float]] = {lakes["one file"]: [], small: []}
    for _ in range(3 if quick else 7):
        for lake, samples in rounds.items():
            seconds, answer = timed(lake)
            assert same(answer, reference)
            samples.append(seconds)
    base = statistics.median(rounds[lakes["one file"]])
    seconds = statistics.median(rounds[small])
    out.append((f"after compaction ({took:.1f} s to compact)", report.files_out, seconds, seconds / base))
    out.append(("one file, interleaved with the line above", 1, base, 1.0))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["ingest", "floor", "compaction"], action="append")
    args = parser.parse_args()
    only = set(args.only or ["ingest", "floor", "compaction"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "ingest" in only:
            results = bench_ingest(root, args.quick)
            print(f"(a) durable TrackEvents ingest, batches of {EVENTS_PER_CALL}, acknowledged after the fsync")
            local = {row[0]: row[3] for row in results["local folder"]}
            rows = [(label, c, p50, p99, rate, f"{rate / local[c]:.2f}x", cpu)
                    for label, result in results.items() for c, p50, p99, rate, cpu in result]
            print_table(rows, ("lake", "in flight", "p50 us", "p99 us", "events/s", "vs local", "server CPU us/event"))
        if "floor" in only:
            floor = bench_floor(root, args.quick)
            print("(b) per-event costs, measured alone in one process (us/event; fsync: us per group commit)")
            print_table([(k, f"{v:.2f}") for k, v in floor.items()], ("step", "us"))
            steps = floor["parse"] + floor["handler"] + floor["encode_800"]
            print(f"    parse + handler + Arrow encoding = {steps:.2f} us/event: at most {1e6 / steps:,.0f} "
                  "events/s on one core before gRPC, asyncio and the client take their share")
        if "compaction" in only:
            print("(c) query time of one day's partition (DuckDB, dedup by id, group by name)")
            print_table(bench_compaction(root, args.quick), ("layout", "files", "seconds", "vs one file"))


if __name__ == "__main__":
    main()
