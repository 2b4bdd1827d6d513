"""The worker's Prometheus metrics and the small listener that serves them.

Batches, events by outcome (inserted, duplicate, dead-lettered), batch latency and size;
lag and pending per partition and the enrichment cache hit ratio, read when scraped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ingest.contract.connections import Redis
from ingest.contract.keys import GROUP, Keys, parse_id
from ingest.contract.latency import LATENCY_BUCKETS
from workers.group.errors import REASONS


class WorkerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.batches = Counter("refstream_batches", "Batches committed and acked", registry=r)
        self.events = Counter("refstream_events_processed", "Stream entries by outcome", ["outcome"], registry=r)
        self.batch_seconds = Histogram(
            "refstream_batch_seconds", "Decode, store, commit and ack one batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "refstream_batch_entries", "Entries per batch", buckets=(1, 10, 50, 100, 250, 500, 1000, 5000), registry=r
        )
        self.lag = Gauge("refstream_stream_lag", "Entries not yet delivered to the group", ["stream"], registry=r)
        self.pending = Gauge("refstream_stream_pending", "Entries delivered, not yet acked", ["stream"], registry=r)
        self.ua_cache_hit_ratio = Gauge(
            "refstream_enrichment_ua_cache_hit_ratio", "User-Agent parser cache hits / lookups", registry=r
        )
        self.oldest_pending_age = Gauge(
            "refstream_stream_oldest_pending_age_seconds",
            "Age of the group's oldest entry delivered and not acked (0: none pending)",
            ["stream"],
            registry=r,
        )
        self.stream_memory = Gauge(
            "refstream_stream_memory_bytes", "MEMORY USAGE of the stream key (sampled)", ["stream"], registry=r
        )
        self.redis_memory_ratio = Gauge(
            "refstream_redis_memory_used_ratio",
            "Redis used_memory / maxmemory (0 without a maxmemory); the edge refuses writes at 1",
            registry=r,
        )
        self.dead_letters = Gauge("refstream_dead_letters", "Entries in the dead-letter stream", registry=r)
        self.blocked = Gauge(
            "refstream_worker_blocked",
            "1 while an outage of this reason holds a batch (the worker waits, nothing is dead-lettered)",
            ["reason"],
            registry=r,
        )
        self.set_blocked([])

    def set_blocked(self, reasons: list[str]) -> None:
        for reason in REASONS:
            self.blocked.labels(reason).set(1 if reason in reasons else 0)

    def batch(self, entries: int, inserted: int, duplicates: int, dead: int, seconds: float) -> None:
        self.batches.inc()
        self.batch_size.observe(entries)
        self.batch_seconds.observe(seconds)
        self.events.labels("inserted").inc(inserted)
        self.events.labels("duplicate").inc(duplicates)
        self.events.labels("dead").inc(dead)

    def watch_cache(self, info: Callable[[], tuple[int, int]]) -> None:
        """``info()`` → (hits, misses)."""

        def ratio() -> float:
            hits, misses = info()
            return hits / (hits + misses) if hits + misses else 0.0

        self.ua_cache_hit_ratio.set_function(ratio)


async def refresh_stream_gauges(metrics: WorkerMetrics, redis: Redis, keys: Keys) -> None:
    """Lag and pending per partition, as XINFO GROUPS reports them (lag needs Redis 7), the
    age of the oldest pending entry (from its id, against Redis's clock), and the length of
    the dead-letter stream; each stream's memory and Redis's memory against its maxmemory."""
    secs, micros = await redis.time()
    now_ms = int(secs) * 1000 + int(micros) // 1000
    for stream in keys.streams:
        metrics.stream_memory.labels(stream).set(int(await redis.memory_usage(stream, samples=10) or 0))
        try:
            groups = await redis.xinfo_groups(stream)
        except Exception:
            continue  # no stream yet
        for g in groups:
            if g["name"] in (GROUP, GROUP.encode()):
                metrics.pending.labels(stream).set(g["pending"])
                if g.get("lag") is not None:
                    metrics.lag.labels(stream).set(g["lag"])
                age = 0.0
                if g["pending"]:
                    oldest = (await redis.xpending(stream, GROUP)).get("min")
                    if oldest is not None:
                        age = max(0.0, (now_ms - parse_id(oldest)[0]) / 1000)
                metrics.oldest_pending_age.labels(stream).set(age)
    metrics.dead_letters.set(await redis.xlen(keys.dead))
    info = await redis.info("memory")
    limit = int(info.get("maxmemory", 0))
    metrics.redis_memory_ratio.set(int(info.get("used_memory", 0)) / limit if limit else 0.0)


@asynccontextmanager
async def serve(
    metrics: WorkerMetrics, host: str, port: int, before_scrape: Callable[[], Awaitable[None]]
) -> AsyncIterator[int]:
    """``/metrics`` on ``host:port`` (0: any free port); yields the port it listens on."""

    async def scrape(request: web.Request) -> web.Response:
        await before_scrape()
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    try:
        sockets = runner.addresses
        yield int(sockets[0][1]) if sockets else port
    finally:
        await runner.cleanup()
