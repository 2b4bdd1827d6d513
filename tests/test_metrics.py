"""/metrics on the edge and on a worker, and request and event ids in the log lines."""

from __future__ import annotations

import re

import aiohttp
import orjson
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ._procs import Procs, free_port
from ._world import BROWSER, call
from .conftest import wait_for
from .test_e2e import fire


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        return samples(await r.text())


async def test_edge_and_worker_metrics_and_ids_in_the_logs(procs: Procs, pg):
    ws = await procs.cli("workspace", "create", "Acme")
    await procs.cli("link", "create", "--workspace", ws["workspace_id"], "--code", "alice")
    edge = await procs.start_edge(REFSTREAM_CLICK_RATE_LIMIT_PER_MIN="1000", REFSTREAM_ACCESS_LOG="all")
    port = free_port()
    procs.start("work", REFSTREAM_METRICS_PORT=str(port))
    assert all(status == 200 for status, _ in await fire(edge, ["alice"] * 7))
    status, _, headers = await call(
        "POST", f"{edge}/api/v1/referral/click/alice", headers={"X-Request-ID": "req-abc-123", "User-Agent": BROWSER}
    )
    assert status == 200 and headers["X-Request-ID"] == "req-abc-123"
    assert re.fullmatch(r"[0-9a-f]{32}", (await call("GET", f"{edge}/healthz"))[2]["X-Request-ID"])

    m = await scrape(f"{edge}/metrics")
    route = (("route", "/api/v1/referral/click/{code}"), ("status", "200"))
    assert m[("refstream_http_requests_total", route)] == 8
    assert m[("refstream_events_accepted_total", (("dialect", "biore"), ("to", "redis")))] == 8
    assert m[("refstream_redis_round_trip_seconds_count", ())] >= 2  # at least a lookup and an XADD
    assert m[("refstream_spool_bytes", ())] == 0

    async def processed() -> bool:
        try:
            w = await scrape(f"http://127.0.0.1:{port}/metrics")
        except aiohttp.ClientConnectionError:
            return False
        return w.get(("refstream_events_processed_total", (("outcome", "inserted"),))) == 8

    await wait_for(processed, timeout=60, what="the worker's metrics to show 8 events")
    w = await scrape(f"http://127.0.0.1:{port}/metrics")
    assert w[("refstream_batches_total", ())] >= 1
    assert 0 <= w[("refstream_enrichment_ua_cache_hit_ratio", ())] <= 1
    assert any(name == "refstream_stream_pending" for name, _ in w)

    procs.stop_all()
    lines = [orjson.loads(line) for line in procs.logs().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("request_id") == "req-abc-123"]
    assert [line["event"] for line in mine] == ["request"]
    assert re.fullmatch(r"[0-9a-f-]{36}", mine[0]["event_id"])  # the event it accepted
    assert mine[0]["route"] == "/api/v1/referral/click/{code}" and mine[0]["status"] == 200  # never the path


@pytest.mark.once
def test_request_series_in_the_text_format():
    """The per-request series are plain counters folded in at scrape time: the text is
    Prometheus's (parsed back by prometheus_client's parser), buckets cumulative, every
    request counted once whatever the access log keeps."""
    from ingest.contract.latency import LATENCY_BUCKETS
    from ingest.edge.metrics import EdgeMetrics

    m = EdgeMetrics()
    for seconds in (0.0002, 0.0005, 0.003, 0.003, 9.0):
        m.observe_request("/r/{code}", 302, seconds)
    m.observe_request("/r/{code}", 429, 0.001)
    m.accepted.labels("biore", "redis").inc()
    m.redis_batch.observe(3)
    text = generate_latest(m.registry).decode()
    s = samples(text)
    route = ("route", "/r/{code}")
    assert s[("refstream_http_requests_total", (route, ("status", "302")))] == 5
    assert s[("refstream_http_requests_total", (route, ("status", "429")))] == 1
    buckets = [s[("refstream_http_request_seconds_bucket", (("le", repr(b)), route))] for b in LATENCY_BUCKETS]
    assert buckets[:4] == [2, 3, 3, 5]  # 0.0005 is in the 0.0005 bucket (le); cumulative
    assert s[("refstream_http_request_seconds_bucket", (("le", "+Inf"), route))] == 6
    assert s[("refstream_http_request_seconds_count", (route,))] == 6
    assert s[("refstream_http_request_seconds_sum", (route,))] == pytest.approx(9.0077)
    assert s[("refstream_events_accepted_total", (("dialect", "biore"), ("to", "redis")))] == 1
    assert s[("refstream_redis_batch_commands_count", ())] == 1
    assert s[("refstream_redis_round_trip_seconds_count", ())] == 0  # exported before the first


async def test_worker_gauges_for_the_oldest_pending_entry_and_the_dead_letters(redis, keys):
    """What the alert rules in deploy/prometheus need: the age of the oldest entry delivered
    and not acked (from its id, on Redis's clock), and how many dead letters wait."""
    from ingest.contract.keys import GROUP
    from ingest.contract.wire import FIELD
    from workers.consumer.metrics import WorkerMetrics, refresh_stream_gauges

    stream, idle = keys.streams[0], keys.streams[1]
    secs, _ = await redis.time()
    old = (int(secs) - 90) * 1000
    for i in range(3):
        await redis.xadd(stream, {FIELD: b"x"}, id=f"{old}-{i}")
    await redis.xgroup_create(stream, GROUP, id="0")
    await redis.xgroup_create(idle, GROUP, id="0", mkstream=True)
    await redis.xreadgroup(GROUP, "c", {stream: ">"}, count=10)
    await redis.xack(stream, GROUP, f"{old}-0")  # the oldest pending is now the second
    for _ in range(2):
        await redis.xadd(keys.dead, {"error": "x"})

    m = WorkerMetrics()
    await refresh_stream_gauges(m, redis, keys)
    w = samples(generate_latest(m.registry).decode())
    age = w[("refstream_stream_oldest_pending_age_seconds", (("stream", stream),))]
    assert 89 <= age < 150, age
    assert w[("refstream_stream_oldest_pending_age_seconds", (("stream", idle),))] == 0
    assert w[("refstream_stream_pending", (("stream", stream),))] == 2
    assert w[("refstream_dead_letters", ())] == 2
