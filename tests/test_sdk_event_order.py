"""An event tracked right after a decision is never ordered before that decision's exposure.

The analysis counts a unit's events from its first exposure on, so an event the lake places
before its exposure is lost. The client runs as its own process with its clock off by seconds
(both directions), many threads (or asyncio tasks) deciding and tracking at once, and every ApplyFlags and
TrackEvents call held back by an independent random delay after it is stamped (as queueing
in a loaded network or server does): the real assignment server must still place every
event at or after its unit's first exposure.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.compute as pc
import pytest

from tests.test_sdk_client import SECRET, start_assignment
from twofold.demo.processes import ROOT, ServerGroup
from twofold.lake import read_table

THREADS, UNITS_PER_THREAD = 12, 30

CLIENT = textwrap.dedent('''
    import asyncio, random, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor

    SKEW_NS = int(float(sys.argv[2]) * 1e9)
    import types
    import client_sdk.async_client, client_sdk.convert, client_sdk.core, client_sdk.sync_client
    from client_sdk import AsyncClient, Client, ClientOptions

    # Every clock reading of the SDK is off by the skew. (Patching time.time_ns for the whole
    # process would also skew gRPC's own timers against its C core, which no real clock does.)
    skewed = types.SimpleNamespace(**{n: getattr(time, n) for n in dir(time) if not n.startswith("_")})
    skewed.time_ns = lambda: time.time_ns() + SKEW_NS
    skewed.time = lambda: time.time() + SKEW_NS / 1e9
    for module in (client_sdk.core, client_sdk.convert, client_sdk.sync_client, client_sdk.async_client):
        module.time = skewed

    delays = ThreadPoolExecutor(64)
    rng = random.Random(7)

    class Delayed:
        """A stub method whose calls leave after a random delay (stamped before it)."""
        def __init__(self, method):
            self.method = method
        def __call__(self, *args, **kwargs):
            return self.method(*args, **kwargs)
        def future(self, request, timeout=None):
            delay = rng.uniform(0, 0.3)
            def later():
                time.sleep(delay)
                return self.method(request, timeout=timeout)
            return delays.submit(later)

    def run_sync():
        client = Client(sys.argv[1], client_secret=sys.argv[3],
                        options=ClientOptions(flush_at_exit=False, flush_interval=0.02, batch_size=4))
        for stub in client._resolvers:
            stub.ApplyFlags = Delayed(stub.ApplyFlags)
            stub.TrackEvents = Delayed(stub.TrackEvents)

        def user(thread):
            for i in range(int(sys.argv[5])):
                unit = f"u{thread}-{i}"
                decision = client.decide("checkout", unit, {"country": "SE"}, default={"enabled": False})
                assert decision.variant == "on", decision
                client.track("purchase", unit, 1.0)
                time.sleep(0.002)

        threads = [threading.Thread(target=user, args=(t,)) for t in range(int(sys.argv[4]))]
        for t in threads: t.start()
        for t in threads: t.join()
        client.close()
        return client.stats

    class DelayedAsync:
        """An aio stub method whose calls leave after a random delay (stamped before it)."""
        def __init__(self, method):
            self.method = method
        async def __call__(self, request, timeout=None):
            await asyncio.sleep(rng.uniform(0, 0.3))
            return await self.method(request, timeout=timeout)

    async def run_async():
        client = AsyncClient(sys.argv[1], client_secret=sys.argv[3],
                             options=ClientOptions(flush_at_exit=False, flush_interval=0.02, batch_size=4))
        client._start()
        for stub in client._resolvers:
            stub.ApplyFlags = DelayedAsync(stub.ApplyFlags)
            stub.TrackEvents = DelayedAsync(stub.TrackEvents)

        async def user(thread):
            for i in range(int(sys.argv[5])):
                unit = f"u{thread}-{i}"
                decision = await client.decide("checkout", unit, {"country": "SE"}, default={"enabled": False})
                assert decision.variant == "on", decision
                client.track("purchase", unit, 1.0)
                await asyncio.sleep(0.002)

        await asyncio.gather(*(user(t) for t in range(int(sys.argv[4]))))
        await client.close()
        return client.stats

    stats = run_sync() if sys.argv[6] == "sync" else asyncio.run(run_async())
    assert stats.events_sent == stats.exposures_sent == int(sys.argv[4]) * int(sys.argv[5]), stats
''')


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("skew_seconds", [-7.0, 5.0])
def test_events_never_precede_their_exposure(tmp_path: Path, skew_seconds: float, flavour: str) -> None:
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    with ServerGroup(tmp_path / "run") as group:
        server = start_assignment(group, tmp_path)
        done = subprocess.run([sys.executable, str(script), server.target, str(skew_seconds), SECRET,
                               str(THREADS), str(UNITS_PER_THREAD), flavour], cwd=ROOT, capture_output=True,
                              text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        assert group.stop("assignment") == 0
    exposures = read_table(tmp_path / "lake", "exposures")
    events = read_table(tmp_path / "lake", "events")
    purchases = events.filter(pc.equal(events.column("name"), "purchase"))
    assert exposures.num_rows == purchases.num_rows == THREADS * UNITS_PER_THREAD
    first: dict[str, int] = {}
    for unit, ts in zip(exposures.column("unit").to_pylist(), exposures.column("ts").to_pylist(), strict=True):
        first[unit] = min(first.get(unit, ts), ts)
    early = [(unit, (first[unit] - ts)) for unit, ts in
             zip(purchases.column("unit").to_pylist(), purchases.column("ts").to_pylist(), strict=True)
             if ts < first[unit]]
    assert early == [], f"{len(early)} of {purchases.num_rows} events before their exposure, e.g. {early[:3]}"
    # The skew is corrected: every record lies in the server's time, not seconds off.
    received = [ts.timestamp() for ts in exposures.column("ts").to_pylist()]
    assert max(received) - min(received) < 60
