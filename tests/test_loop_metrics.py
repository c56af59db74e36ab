"""twofold.loop_metrics against prometheus_client itself: the same updates, the same exposition."""

from __future__ import annotations

import random
import threading

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from twofold import loop_metrics

BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 1.0)


def _samples(registry: CollectorRegistry) -> list[str]:
    """Exposition lines without comments and without prometheus_client's `_created` series."""
    lines = generate_latest(registry).decode().splitlines()
    return sorted(line for line in lines if not line.startswith("#") and "_created" not in line)


def test_counter_and_histogram_expose_what_prometheus_client_exposes() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    c_ours = loop_metrics.LoopCounter("calls", "Calls.", ("method", "code"), ours)
    h_ours = loop_metrics.LoopHistogram("latency_seconds", "Latency.", ("method",), BUCKETS, ours)
    c_theirs = Counter("calls", "Calls.", ("method", "code"), registry=theirs)
    h_theirs = Histogram("latency_seconds", "Latency.", ("method",), buckets=BUCKETS, registry=theirs)
    rng = random.Random(7)
    for _ in range(5000):
        method, code = rng.choice(["Predict", "Decide"]), rng.choice(["OK", "NOT_FOUND"])
        amount = rng.choice([1, 1, 3])
        c_ours.labels(method, code).inc(amount)
        c_theirs.labels(method, code).inc(amount)
        # Values on bucket bounds too: both must count them as "less than or equal".
        value = rng.choice([rng.uniform(0, 0.002), rng.choice(BUCKETS), 5.0])
        h_ours.labels(method).observe(value)
        h_theirs.labels(method).observe(value)
    assert _samples(ours) == _samples(theirs)
    assert ours.get_sample_value("latency_seconds_bucket", {"method": "Predict", "le": "+Inf"}) > 2000


def test_counters_refuse_negative_increments_and_wrong_label_counts() -> None:
    registry = CollectorRegistry()
    counter = loop_metrics.LoopCounter("things", "Things.", ("kind",), registry)
    with pytest.raises(ValueError, match="non-negative"):
        counter.labels("a").inc(-1)
    with pytest.raises(ValueError, match="takes labels"):
        counter.labels("a", "b")


def test_scrapes_while_the_loop_thread_creates_children_and_counts() -> None:
    registry = CollectorRegistry()
    counter = loop_metrics.LoopCounter("events", "Events.", ("key",), registry)
    done = threading.Event()
    errors: list[BaseException] = []

    def scrape() -> None:
        try:
            while not done.is_set():
                generate_latest(registry)
        except BaseException as exc:  # reported below
            errors.append(exc)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        for i in range(20_000):
            counter.labels(str(i % 500)).inc()
    finally:
        done.set()
        scraper.join(10)
    assert not errors
    assert sum(registry.get_sample_value("events_total", {"key": str(k)}) for k in range(500)) == 20_000


def test_multiprocess_mode_gets_prometheus_client_metrics(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert isinstance(loop_metrics.counter("mp_calls", "Calls.", ("a",), registry=None), Counter)
    assert isinstance(loop_metrics.histogram("mp_seconds", "Seconds.", ("a",), BUCKETS, registry=None), Histogram)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    assert isinstance(loop_metrics.counter("calls2", "Calls.", ("a",), registry=None), loop_metrics.LoopCounter)
