"""Counters and histograms for the request path: plain numbers on the event loop, read at scrape time.

A `prometheus_client` Counter.inc or Histogram.observe takes a lock and runs a few Python
calls; in a hot loop that is well under a microsecond, but a server handles each call on caches
that the gRPC machinery has just evicted, and there one increment measured ~8 µs and one
observation ~11 µs (bench VM, caches flushed between calls). A Twofold call touches four to
seven of them. The metrics here keep one float per child (and one count per bucket), so an
update is an attribute increment, and they expose themselves to the registry as ordinary
counter and histogram families when Prometheus scrapes.

Updates must come from one thread (the event loop that runs the handlers): an increment is
not atomic across threads. A scrape, on the HTTP thread, only reads; it may see a histogram's
sum a moment ahead of its buckets, never a corrupted value.

Under prometheus_client's multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`, the model server's
`--workers`) values must live in the shared files, so `counter` and `histogram` hand back the
ordinary prometheus_client metrics there.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class CounterChild(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class HistogramChild(Protocol):
    def observe(self, amount: float) -> None: ...


class LabelledCounter(Protocol):
    def labels(self, *values: str) -> CounterChild: ...


class LabelledHistogram(Protocol):
    def labels(self, *values: str) -> HistogramChild: ...


class _CounterValue:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self.value += amount


class _HistogramValue:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)  # the last bound is +Inf
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        # Prometheus buckets are "less than or equal": the first bound >= amount.
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class _LoopMetric(Collector):
    """Children by label values; `collect` turns them into one metric family."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: CollectorRegistry | None) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()  # guards creating children against a scrape copying them
        if registry is not None:
            registry.register(self)

    def _new_child(self) -> Any:
        raise NotImplementedError

    def labels(self, *values: str) -> Any:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.setdefault(key, self._new_child())
        return child

    def _snapshot(self) -> list[tuple[tuple[str, ...], Any]]:
        with self._lock:
            return list(self._children.items())

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def _family(self) -> Any:
        raise NotImplementedError


class LoopCounter(_LoopMetric):
    """A labelled counter exposed as `<name>_total`, like prometheus_client's Counter."""

    def _new_child(self) -> _CounterValue:
        return _CounterValue()

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in self._snapshot():
            family.add_metric(values, child.value)
        yield family


class LoopHistogram(_LoopMetric):
    """A labelled histogram with fixed buckets (+Inf added), like prometheus_client's Histogram."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float],
                 registry: CollectorRegistry | None) -> None:
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != float("inf"):
            bounds.append(float("inf"))
        self.bounds = bounds
        self._les = [floatToGoString(b) for b in bounds]
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> _HistogramValue:
        return _HistogramValue(self.bounds)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in self._snapshot():
            total, sum_value = 0, child.sum
            buckets = []
            for le, count in zip(self._les, list(child.counts), strict=True):
                total += count
                buckets.append((le, total))
            family.add_metric(values, buckets, sum_value)
        yield family


def _multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir"))


def counter(name: str, documentation: str, labelnames: Sequence[str],
            registry: CollectorRegistry | None = REGISTRY) -> LabelledCounter:
    """A counter for the request path (prometheus_client's own under multiprocess mode)."""
    if _multiprocess():
        return Counter(name, documentation, labelnames, registry=registry)
    return LoopCounter(name, documentation, labelnames, registry)


def histogram(name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float],
              registry: CollectorRegistry | None = REGISTRY) -> LabelledHistogram:
    """A histogram for the request path (prometheus_client's own under multiprocess mode)."""
    if _multiprocess():
        return Histogram(name, documentation, labelnames, buckets=buckets, registry=registry)
    return LoopHistogram(name, documentation, labelnames, buckets, registry)
