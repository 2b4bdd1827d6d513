"""An open-loop, rate-limited load generator (asyncio + aiohttp, in the bench process).

Requests are started on a fixed schedule, ``rate`` per second in 5 ms ticks, whether or
not earlier ones have been answered: a slow server meets more concurrent requests rather
than fewer (no coordinated omission). The achieved rate and failures are reported, and on
request each answer's latency (the pipeline's own latency is measured from the event rows).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from .wrk import Request

TICK_S = 0.005


@dataclass(slots=True)
class OpenLoopResult:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    seconds: float = 0.0
    max_in_flight: int = 0

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


async def run(
    base_url: str,
    requests: Sequence[Request],
    *,
    rate: float,
    seconds: float,
    stop: asyncio.Event | None = None,
    latencies: list[tuple[float, float]] | None = None,
) -> OpenLoopResult:
    """Send ``rate`` requests/s for ``seconds`` (or until ``stop`` is set); ``latencies``, if
    given, gets (seconds since the start when sent, seconds to the answer) per 2xx answer."""
    result = OpenLoopResult()
    in_flight: set[asyncio.Task[None]] = set()
    connector = aiohttp.TCPConnector(limit=512, ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(total=30)

    async def one(http: aiohttp.ClientSession, req: Request) -> None:
        sent = time.monotonic()
        try:
            async with http.post(base_url + req.path, data=req.body.encode(), headers=req.headers) as r:
                await r.read()
                if 200 <= r.status < 300:
                    result.ok += 1
                    if latencies is not None:
                        latencies.append((sent - start, time.monotonic() - sent))
                else:
                    result.failed += 1
        except (TimeoutError, aiohttp.ClientError):
            result.failed += 1

    async with aiohttp.ClientSession(connector=connector, timeout=timeout, skip_auto_headers=["User-Agent"]) as http:
        start = time.monotonic()
        i = 0
        while True:
            elapsed = time.monotonic() - start
            if elapsed >= seconds or (stop is not None and stop.is_set()):
                break
            due = int(elapsed * rate)
            while result.sent < due:
                task = asyncio.create_task(one(http, requests[i % len(requests)]))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                result.sent += 1
                i += 1
            result.max_in_flight = max(result.max_in_flight, len(in_flight))
            await asyncio.sleep(TICK_S)
        result.seconds = time.monotonic() - start
        if in_flight:
            await asyncio.wait(in_flight, timeout=30)
    return result
