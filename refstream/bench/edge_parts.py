"""Parts (a) and (b): the edge against a bare aiohttp app, behind the same wrk settings,
one server process each; (c), against the naive design, is in ``naive_part``."""

from __future__ import annotations

from ingest.keys import Keys

from . import requests as reqs
from .context import Ctx
from .world import delete_keys, warm


async def part_a(ctx: Ctx) -> None:
    """(a) bare aiohttp hello-world POST: the ceiling of an aiohttp edge on this box."""
    hello = ctx.procs.app("hello")
    try:
        await ctx.wrk("a", hello.base_url, reqs.seed_000(ctx.world), connections=ctx.opts.connections,
                      server_pid=hello.pid)  # fmt: skip
    finally:
        hello.stop()


async def stream_bytes(ctx: Ctx, keys: Keys) -> tuple[int, int]:
    """(bytes, entries) over every stream partition."""
    total = entries = 0
    for stream in keys.streams:
        if await ctx.redis.exists(stream):
            total += int(await ctx.redis.memory_usage(stream, samples=0) or 0)
            entries += int(await ctx.redis.xlen(stream))
    return total, entries


async def part_b(ctx: Ctx) -> None:
    """(b) the edge per seed route, its ratio to (a); the batch endpoint against the
    single-event route of the same click shape (seed 003); (g) the edge's peak RSS and
    the Redis bytes of each event it appended."""
    keys = ctx.keys("b")
    await warm(ctx.world, ctx.redis, keys)
    edge = ctx.procs.edge(REFSTREAM_STREAM_PREFIX=keys.prefix)
    try:
        for name, build in reqs.ROUTES.items():
            if ctx.wants(name) or (name == "b003" and ctx.wants("batch")):
                await ctx.wrk(name, edge.base_url, build(ctx.world), connections=ctx.opts.connections,
                              server_pid=edge.pid, profile="edge" if name == "b000" else None)  # fmt: skip
                if "a.rps" in ctx.figures:
                    ctx.note(f"{name}.ratio_a", ctx.figures[f"{name}.rps"] / ctx.figures["a.rps"])
        if ctx.wants("batch"):
            r = await ctx.wrk("batch", edge.base_url, reqs.batch(ctx.world), connections=ctx.opts.batch_connections,
                              server_pid=edge.pid)  # fmt: skip
            events = r.rps * reqs.BATCH_EVENTS
            ctx.note("batch.events_per_s", events)
            ctx.note("batch.events_per_edge_core", events)  # one edge process
            ctx.note("batch.events_per_edge_cpu_s", events / r.server_cpu if r.server_cpu else 0.0)
            single = ctx.figures["b003.rps"]
            ctx.note("batch.single_events_per_s", single)
            ctx.note("batch.single_events_per_edge_cpu_s", single / ctx.figures["b003.server_cpu"])
            ctx.note("batch.ratio_single", events / single)
        ctx.rss("edge", edge)
        size, entries = await stream_bytes(ctx, keys)
        if entries:
            ctx.note("g.redis_bytes_per_event_b", size / entries)
    finally:
        edge.stop()
        await delete_keys(ctx.redis, keys.prefix)
