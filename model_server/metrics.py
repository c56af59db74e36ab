"""The model server's Prometheus metrics (names fixed by docs/metrics.md).

Children are bound once per loaded version (`VersionMetrics`), so a call pays for counter
increments and histogram observations, not for label lookups; those on the request path are
`twofold.loop_metrics` (plain numbers read at scrape time) except under `--workers`. Gauges declare how to
combine values across `--workers` processes (prometheus_client multiprocess mode).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from twofold import loop_metrics

# From 25 µs: ONNX Runtime scores a row in ~5 µs, a batch of 100 in well under a millisecond.
MODEL_LATENCY_BUCKETS = (
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)
PROPENSITY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)

REQUESTS = loop_metrics.counter("twofold_model_requests", "Predict / Score / Decide / ModelInfer calls.",
                   ("model", "version", "method"))
FAILURES = Counter("twofold_model_failures", "Failed calls by reason.", ("model", "version", "reason"))
LATENCY = loop_metrics.histogram("twofold_model_latency_seconds", "Time inside the model, per call.",
                                 ("model", "version", "method"), buckets=MODEL_LATENCY_BUCKETS)
BATCH_SIZE = loop_metrics.histogram("twofold_model_batch_size", "Rows per call.", ("model", "method"),
                                    buckets=BATCH_BUCKETS)
RUN_ROWS = loop_metrics.histogram(
    "twofold_model_coalesced_run_rows", "Rows per ONNX Runtime run of coalesced one-row calls.",
    ("model", "method"), buckets=BATCH_BUCKETS)
LOADED_VERSIONS = Gauge("twofold_model_loaded_versions", "Versions loaded and serving.", ("model",),
                        multiprocess_mode="livemax")
LOAD_FAILURES = Counter("twofold_model_load_failures", "Refused or broken versions.", ("model",))
DECISIONS = loop_metrics.counter("twofold_bandit_decisions", "Decisions per arm.", ("model", "version", "arm"))
PROPENSITY = loop_metrics.histogram("twofold_bandit_propensity", "Propensity of the chosen arm.", ("model",),
                                    buckets=PROPENSITY_BUCKETS)

METHODS = ("Predict", "Score", "Decide", "ModelInfer")
COALESCED_METHODS = ("Predict", "Decide")


@dataclass(frozen=True)
class MethodMetrics:
    """Pre-bound children for one (model, version, method)."""

    requests: loop_metrics.CounterChild
    latency: loop_metrics.HistogramChild
    batch: loop_metrics.HistogramChild


class VersionMetrics:
    """All metric children one loaded version touches on its hot path."""

    def __init__(self, model: str, version: str, arms: tuple[str, ...]) -> None:
        self.model = model
        self.version = version
        self.methods = {m: MethodMetrics(REQUESTS.labels(model, version, m), LATENCY.labels(model, version, m),
                                         BATCH_SIZE.labels(model, m)) for m in METHODS}
        self.run_rows = {m: RUN_ROWS.labels(model, m) for m in COALESCED_METHODS}
        self.decisions = [DECISIONS.labels(model, version, arm) for arm in arms]
        self.propensity = PROPENSITY.labels(model)
        self._failures: dict[str, Counter] = {}

    def failure(self, reason: str) -> None:
        child = self._failures.get(reason)
        if child is None:
            child = self._failures[reason] = FAILURES.labels(self.model, self.version, reason)
        child.inc()


def count_failure(model: str, version: str, reason: str) -> None:
    """Count a failure that happened before a version was resolved (unknown model, ...)."""
    FAILURES.labels(model, version, reason).inc()
