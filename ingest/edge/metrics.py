"""The edge's Prometheus metrics, in a registry of its own (one per app, so several apps
in one process, as in tests, do not collide), served at ``GET /metrics``.

Every request is counted, so counting must cost next to nothing: the per-request series
are plain integers and bucket arrays in this process (no lock, no label lookup through
prometheus_client's children), turned into metric families only when ``/metrics`` is
scraped. The exposition is prometheus_client's own text format, so scrapers, promtool and
a parent merging its children's texts read it as before."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ingest.contract.latency import LATENCY_BUCKETS

# the spool's file-system operations, each exported from the start (a rate needs its zero)
SPOOL_OPS = ("append", "drain_read", "drain_delete", "drain_lock", "vacuum")


class SpoolView(Protocol):
    errors: Any  # op -> failures (a Counter)

    def size(self) -> int: ...
    def entries(self) -> int: ...
    def failing(self) -> dict[str, str]: ...


BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class Series:
    """One histogram series: a count per bucket (the last one past every bound) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, Prometheus's ``le`` (a value on a bound is in it)
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((_le(bound), float(total)))
        return out


class Histogram(Collector):
    """A histogram with (optional) labels, prometheus_client's ``observe`` / ``labels()``
    calls without its lock and per-call label handling."""

    def __init__(self, name: str, doc: str, labels: Sequence[str] = (), *, buckets: Sequence[float]) -> None:
        self.name, self.doc, self.labelnames = name, doc, tuple(labels)
        self.bounds = tuple(buckets)
        self.series: dict[tuple[Any, ...], Series] = {}
        if not self.labelnames:
            self._one = self.labels()

    def labels(self, *values: Any) -> Series:
        s = self.series.get(values)
        if s is None:
            s = self.series[values] = Series(self.bounds)
        return s

    def observe(self, value: float) -> None:
        self._one.observe(value)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, s in sorted(self.series.items(), key=lambda kv: [str(v) for v in kv[0]]):
            family.add_metric([str(v) for v in values], s.buckets(), s.sum)
        yield family


class _Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class Counter(Collector):
    """A labelled counter: ``labels(...)`` finds a plain integer cell; exported as ``<name>_total``."""

    def __init__(self, name: str, doc: str, labels: Sequence[str]) -> None:
        self.name, self.doc, self.labelnames = name, doc, tuple(labels)
        self.cells: dict[tuple[Any, ...], _Count] = {}

    def labels(self, *values: Any) -> _Count:
        c = self.cells.get(values)
        if c is None:
            c = self.cells[values] = _Count()
        return c

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, c in sorted(self.cells.items(), key=lambda kv: [str(v) for v in kv[0]]):
            family.add_metric([str(v) for v in values], float(c.value))
        yield family


class _RouteStats:
    __slots__ = ("latency", "statuses")

    def __init__(self) -> None:
        self.latency = Series(LATENCY_BUCKETS)
        self.statuses: dict[int, int] = {}


class Requests(Collector):
    """Answered requests by route and status, and their latency by route."""

    def __init__(self) -> None:
        self.routes: dict[str, _RouteStats] = {}

    def observe(self, route: str, status: int, seconds: float) -> None:
        r = self.routes.get(route)
        if r is None:
            r = self.routes[route] = _RouteStats()
        r.statuses[status] = r.statuses.get(status, 0) + 1
        r.latency.observe(seconds)

    def collect(self) -> Iterator[Metric]:
        count = CounterMetricFamily("refstream_http_requests", "HTTP requests answered", labels=["route", "status"])
        seconds = HistogramMetricFamily("refstream_http_request_seconds", "Time to answer", labels=["route"])
        for route, r in sorted(self.routes.items()):
            for status, n in sorted(r.statuses.items()):
                count.add_metric([route, str(status)], float(n))
            seconds.add_metric([route], r.latency.buckets(), r.latency.sum)
        yield count
        yield seconds


class EdgeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Requests()
        self.accepted = Counter(
            "refstream_events_accepted", "Events accepted, and where they went (redis or spool)", ["dialect", "to"]
        )
        self.redis_seconds = Histogram(
            "refstream_redis_round_trip_seconds",
            "One micro-batched pipeline round trip (XADDs, limits, lookups)",
            buckets=LATENCY_BUCKETS,
        )
        self.redis_batch = Histogram(
            "refstream_redis_batch_commands", "Commands per micro-batched round trip", buckets=BATCH_BUCKETS
        )
        self._spool = _SpoolCollector()  # zeros until watch_spool names the edge's spool
        for c in (self.requests, self.accepted, self.redis_seconds, self.redis_batch, self._spool):
            r.register(c)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request (its route, status and time to answer)."""
        self.requests.observe(route, status, seconds)

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
