"""The edge's Prometheus metrics, in a registry of its own (one per app, so several apps
in one process, as in tests, do not collide), served at ``GET /metrics``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# the spool's file-system operations, each exported from the start (a rate needs its zero)
SPOOL_OPS = ("append", "drain_read", "drain_delete", "drain_lock", "vacuum")


class SpoolView(Protocol):
    errors: Any  # op -> failures (a Counter)

    def size(self) -> int: ...
    def entries(self) -> int: ...
    def failing(self) -> dict[str, str]: ...


LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class EdgeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("refstream_http_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.request_seconds = Histogram(
            "refstream_http_request_seconds", "Time to answer", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.accepted = Counter(
            "refstream_events_accepted", "Events accepted, and where they went (redis or spool)",
            ["dialect", "to"], registry=r,
        )  # fmt: skip
        self.redis_seconds = Histogram(
            "refstream_redis_round_trip_seconds", "One micro-batched pipeline round trip (XADDs, limits, lookups)",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.redis_batch = Histogram(
            "refstream_redis_batch_commands", "Commands per micro-batched round trip",
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500), registry=r,
        )  # fmt: skip

        self._spool = _SpoolCollector()  # zeros until watch_spool names the edge's spool
        r.register(self._spool)
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request: the labelled children are looked up once per
        (route, status), not per request (``labels()`` takes a lock and builds a key)."""
        pair = self._children.get((route, status))
        if pair is None:
            pair = (self.requests.labels(route, str(status)), self.request_seconds.labels(route))
            self._children[(route, status)] = pair
        pair[0].inc()
        pair[1].observe(seconds)

    def watch_spool(self, spool: SpoolView) -> None:
        """The spool's gauges and error counters, read from it at each scrape (O(1))."""
        self._spool.spool = spool


class _SpoolCollector(Collector):
    def __init__(self) -> None:
        self.spool: SpoolView | None = None

    def collect(self) -> Iterator[Metric]:
        s = self.spool
        size, entries = (s.size(), s.entries()) if s is not None else (0, 0)
        yield GaugeMetricFamily("refstream_spool_bytes", "Bytes waiting in the local spool", value=size)
        yield GaugeMetricFamily("refstream_spool_entries", "Events waiting in the local spool", value=entries)
        errors = CounterMetricFamily(
            "refstream_spool_errors", "Spool file-system operations that failed (disk full, I/O error)", labels=["op"]
        )
        failing = GaugeMetricFamily(
            "refstream_spool_failing", "1 while this spool operation fails, else 0", labels=["op"]
        )
        now = s.failing() if s is not None else {}
        counts = s.errors if s is not None else {}
        for op in sorted(set(SPOOL_OPS) | set(counts)):
            errors.add_metric([op], float(counts.get(op, 0)))
            failing.add_metric([op], 1.0 if op in now else 0.0)
        yield errors
        yield failing
