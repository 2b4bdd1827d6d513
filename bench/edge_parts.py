"""Parts (a) and (b): the edge against a bare aiohttp app, behind the same wrk settings,
one server process each; with part (n), (a) and each (b) route again at N processes (the
CPU count), side by side. (c), against the naive design, is in ``naive_part``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ingest.contract.keys import Keys

from . import requests as reqs
from .context import Ctx
from .world import delete_keys, warm
from .wrk import Request


def processes() -> int:
    """N of part (n): what ``refstream serve`` runs by default (the CPU count)."""
    from ingest.host.prefork import cpu_count

    return cpu_count()


async def part_a(ctx: Ctx) -> None:
    """(a) bare aiohttp hello-world POST: the ceiling of an aiohttp edge on this box; with
    part (n), also N processes of it on the port (SO_REUSEPORT), the ceiling at N."""
    hello = ctx.procs.app("hello")
    try:
        await ctx.wrk(
            "a", hello.base_url, reqs.seed_000(ctx.world), connections=ctx.opts.connections, server_pid=hello.pid
        )
    finally:
        hello.stop()
    if not ctx.wants("n"):
        return
    n = processes()
    hello = ctx.procs.app("hello", "--processes", str(n))
    try:
        r = await ctx.wrk(
            "a_n", hello.base_url, reqs.seed_000(ctx.world), connections=ctx.opts.connections, server_pid=hello.pid
        )
    finally:
        hello.stop()
    ctx.note("a_n.processes", n)
    ctx.note("a_n.scale", r.rps / ctx.figures["a.rps"])


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
    # part (n): the same routes on N processes, measured right after each one-process run
    edge_n = (
        ctx.procs.edge(REFSTREAM_STREAM_PREFIX=keys.prefix, REFSTREAM_PROCESSES=str(processes()))
        if ctx.wants("n")
        else None
    )
    try:
        for name, build in reqs.ROUTES.items():
            if ctx.wants(name) or (name == "b003" and ctx.wants("batch")):
                async with _redis_cpu(ctx, name):
                    await ctx.wrk(
                        name,
                        edge.base_url,
                        build(ctx.world),
                        connections=ctx.opts.connections,
                        server_pid=edge.pid,
                        profile="edge" if name == "b000" else None,
                    )
                if "a.rps" in ctx.figures:
                    ctx.note(f"{name}.ratio_a", ctx.figures[f"{name}.rps"] / ctx.figures["a.rps"])
                if edge_n is not None and ctx.wants(name):
                    await _at_n(ctx, name, edge_n.base_url, build(ctx.world), edge_n.pid)
        if edge_n is not None:
            edge_n.stop()
        if ctx.wants("batch"):
            r = await ctx.wrk(
                "batch",
                edge.base_url,
                reqs.batch(ctx.world),
                connections=ctx.opts.batch_connections,
                server_pid=edge.pid,
            )
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
        if edge_n is not None:
            edge_n.stop()
        await delete_keys(ctx.redis, keys.prefix)


async def _at_n(ctx: Ctx, name: str, base_url: str, requests: list[Request], pid: int) -> None:
    """(n) one route on N edge processes: its figures under ``<name>_n``, its ratio to
    hello-world at N (``ratio_a_n``) and to itself at one process (``scale``)."""
    async with _redis_cpu(ctx, f"{name}_n"):
        r = await ctx.wrk(f"{name}_n", base_url, requests, connections=ctx.opts.connections, server_pid=pid)
    ctx.note(f"{name}_n.processes", processes())
    ctx.note(f"{name}_n.scale", r.rps / ctx.figures[f"{name}.rps"])
    if "a_n.rps" in ctx.figures:
        ctx.note(f"{name}_n.ratio_a_n", r.rps / ctx.figures["a_n.rps"])


@asynccontextmanager
async def _redis_cpu(ctx: Ctx, name: str) -> AsyncIterator[None]:
    """``<name>.redis_cpu``: the cores Redis used (INFO cpu, every thread) over the phase,
    its warm-up included: with N edge processes each micro-batching its own round trips,
    Redis may be what stops the edge from scaling (only when part n runs)."""
    if not ctx.wants("n"):
        yield
        return
    start, t0 = await _cpu_seconds(ctx), time.monotonic()
    yield
    ctx.note(f"{name}.redis_cpu", (await _cpu_seconds(ctx) - start) / (time.monotonic() - t0))


async def _cpu_seconds(ctx: Ctx) -> float:
    info = await ctx.redis.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
