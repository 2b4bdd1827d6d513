"""Part (i): what idempotency keys cost the edge. One route (seed 003, the Affixo click),
one edge process, three loads in the same run: no key; a fresh key on every request (the
append-or-answer script runs in place of the XADD and stores each answer); and repeats of
a few keys (answered from their records, nothing appended)."""

from __future__ import annotations

from ingest.edge.idempotency import HEADER

from . import requests as reqs
from .context import Ctx
from .world import delete_keys, warm
from .wrk import Request


async def part_i(ctx: Ctx) -> None:
    keys = ctx.keys("i")
    await warm(ctx.world, ctx.redis, keys)
    edge = ctx.procs.edge(REFSTREAM_STREAM_PREFIX=keys.prefix)
    plain = reqs.seed_003(ctx.world)
    # 256 keys, one per request variant: after the warm-up every request is a repeat
    repeated = [Request(r.path, r.body, {**r.headers, HEADER: f"bench-{i}"}) for i, r in enumerate(plain)]
    c = ctx.opts.connections
    try:
        base = await ctx.wrk("i.plain", edge.base_url, plain, connections=c, server_pid=edge.pid, per_request=True)
        keyed = await ctx.wrk("i.keyed", edge.base_url, plain, connections=c, server_pid=edge.pid, unique=HEADER)
        again = await ctx.wrk("i.replay", edge.base_url, repeated, connections=c, server_pid=edge.pid, per_request=True)
        ctx.note("i.ratio_keyed", keyed.rps / base.rps)
        ctx.note("i.ratio_replay", again.rps / base.rps)
        if base.server_cpu and keyed.server_cpu:  # edge CPU per request, keyed over plain
            ctx.note("i.cpu_per_request_keyed", (keyed.server_cpu / keyed.rps) / (base.server_cpu / base.rps))
        ctx.rss("edge", edge)
    finally:
        edge.stop()
        await delete_keys(ctx.redis, keys.prefix)
