"""Part (shards), outside the default set (``--only shards``): the worker's committed
events/s with the same workspaces on one Postgres primary and spread over two.

Each primary is a Postgres server of the part's own (``bench.private_pg``), started for
the run and deleted after it: a second database on one server would share that server's
processes, buffers and WAL, and measure nothing. Server A holds the directory
(``DATABASE_URL``, the shard ``default``); server B the shard ``b``. Each case starts from
fresh databases: ``refstream migrate``, then for two shards ``refstream shards add b``,
then ``refstream workspace create`` for each workspace (``--shard`` default or b, in turn).
Each workspace gets a program, an affiliate and its links on its shard (their codes
claimed in the directory when there are shards).

The load is part (d)'s: ``--drain-events`` mixed events (clicks, leads, conversions),
spread evenly over the workspaces and shuffled, appended to the streams, then stored by
one ``refstream work --drain``. Events/s is from the worker's first read until the streams
are drained (as in (d) and (p)). One shard, then two, in each run (A/B, A/B, ... with
``--runs``); the ratio two / one is taken within a run and its median over the runs.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
from typing import Any

import asyncpg
import orjson

from ingest.contract import clicks
from ingest.contract.events import Envelope, uuid7

from .context import Ctx, say
from .pipeline_parts import _drained, _until
from .private_pg import PrivatePostgres
from .procs import REFSTREAM
from .world import World, backlog, fill, mixed
from .wrk import proc_cpu_seconds

WORKSPACES = 4
LINKS_EACH = 16
CASES = ("one", "two")


async def _cli(ctx: Ctx, directory_url: str, *args: str) -> Any:
    """``refstream ARGS --json`` against the directory; its JSON answer."""
    env = {**ctx.procs.env, "DATABASE_URL": directory_url}
    done = await asyncio.to_thread(
        subprocess.run, [REFSTREAM, *args, "--json"], env=env, capture_output=True, timeout=300, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"refstream {' '.join(args)} failed: {done.stderr.decode(errors='replace')[-2000:]}")
    return orjson.loads(done.stdout)


async def _links(url: str, ws: str, w: int) -> list[str]:
    """A program, an affiliate and ``LINKS_EACH`` links of workspace ``ws`` on its shard."""
    codes = [f"S{w}L{i:03d}" for i in range(LINKS_EACH)]
    conn = await asyncpg.connect(url)
    try:
        program = await conn.fetchval(
            "INSERT INTO programs (workspace_id, name, url, cookie_window_days)"
            " VALUES ($1, 'Main', 'https://yoursite.com/', 60) RETURNING id",
            ws,
        )
        affiliate = await conn.fetchval(
            "INSERT INTO affiliates (workspace_id, program_id, external_id, name, email)"
            " VALUES ($1, $2, 'user_123', 'Alex', 'alex@example.com') RETURNING id",
            ws,
            program,
        )
        await conn.executemany(
            "INSERT INTO links (workspace_id, program_id, affiliate_id, code, url, domain)"
            " VALUES ($1, $2, $3, $4, 'https://yoursite.com/pricing', 'yoursite.com')",
            [(ws, program, affiliate, c) for c in codes],
        )
    finally:
        await conn.close()
    return codes


async def _setup(
    ctx: Ctx, case: str, a: PrivatePostgres, b: PrivatePostgres
) -> tuple[str, dict[str, str], list[World]]:
    """Fresh databases for ``case``, its workspaces placed and given links: the
    directory's URL, each shard's URL by name, and a world per workspace."""
    name = f"refstream_shards_r{ctx.run}_{case}"
    directory = a.url_for(name)
    urls = {"default": directory}
    await _cli(ctx, directory, "migrate")
    if case == "two":
        urls["b"] = b.url_for(name + "_b")
        await _cli(ctx, directory, "shards", "add", "b", urls["b"])
    worlds: list[World] = []
    for w in range(WORKSPACES):
        shard = ("default", "b")[w % 2] if case == "two" else "default"
        placed = ("--shard", shard) if case == "two" else ()
        made = await _cli(ctx, directory, "workspace", "create", f"W{w}", *placed)
        ws = made["workspace_id"]
        codes = await _links(urls[shard], ws, w)
        if case == "two":
            conn = await asyncpg.connect(directory)
            try:
                await conn.execute(
                    "INSERT INTO link_codes (code, workspace_id) SELECT unnest($1::text[]), $2::uuid", codes, ws
                )
            finally:
                await conn.close()
        server = b if shard == "b" else a
        worlds.append(World(server.url, urls[shard].rsplit("/", 1)[1], ws, made["api_key"], codes, []))
    return directory, urls, worlds


def _events(ctx: Ctx, worlds: list[World]) -> list[Envelope]:
    """``--drain-events`` mixed events, an equal share for each workspace, shuffled."""
    rng = random.Random(ctx.run)
    out: list[Envelope] = []
    share = ctx.opts.drain_events // len(worlds)
    for world in worlds:
        world.click_ids = [clicks.mint(uuid7()) for _ in range(64)]
        out += mixed(world, share, rng)
    rng.shuffle(out)
    return out


def _cpu(servers: list[PrivatePostgres], worker: int) -> dict[str, float]:
    """CPU seconds so far of the worker and of each server (its postmaster and every live
    backend and helper under it)."""
    out = {"worker": proc_cpu_seconds(worker)}
    for s in servers:
        out[f"pg_{s.name}"] = proc_cpu_seconds(s.pid)
    return out


async def _stored(urls: dict[str, str]) -> dict[str, int]:
    out = {}
    for shard, url in urls.items():
        conn = await asyncpg.connect(url)
        try:
            out[shard] = int(await conn.fetchval("SELECT count(*) FROM events"))
        finally:
            await conn.close()
    return out


async def _checkpoint(servers: list[PrivatePostgres]) -> None:
    """Each server's dirty pages written before a case starts, so neither case inherits
    the other's."""
    for s in servers:
        conn = await asyncpg.connect(s.url)
        try:
            await conn.execute("CHECKPOINT")
        finally:
            await conn.close()


async def _case(ctx: Ctx, case: str, a: PrivatePostgres, b: PrivatePostgres) -> None:
    """One case: fresh databases, the load appended, one ``work --drain``; its figures
    under ``shards.<case>``."""
    directory, urls, worlds = await _setup(ctx, case, a, b)
    envelopes = _events(ctx, worlds)
    keys = ctx.keys(f"shards_{case}")
    await fill(ctx.redis, keys, envelopes)
    await _checkpoint([a, b])
    load = os.getloadavg()[0]
    name = f"worker-shards-{case}"
    worker = ctx.procs.refstream(name, "work", "--drain", DATABASE_URL=directory, REFSTREAM_STREAM_PREFIX=keys.prefix)

    async def started() -> bool:
        return (await backlog(ctx.redis, keys))[1] > 0

    t0 = await _until("the worker to read", started, 120, every=0.01)
    cpu0 = _cpu([a, b], worker.pid)
    t1 = await _drained(ctx, keys, limit_s=900)
    cpu1 = _cpu([a, b], worker.pid)
    if worker.wait(120) != 0:
        raise RuntimeError(f"work --drain failed: {ctx.procs.tail(name)}")
    wall = t1 - t0
    stored = await _stored(urls)
    p = f"shards.{case}"
    ctx.note(f"{p}.events", len(envelopes))
    ctx.note(f"{p}.events_per_s", len(envelopes) / wall)
    ctx.note(f"{p}.stored", sum(stored.values()))
    if "b" in stored:
        ctx.note(f"{p}.stored_on_b", stored["b"])
    used = {k: cpu1[k] - cpu0[k] for k in cpu1}
    for k, seconds in used.items():
        ctx.note(f"{p}.{k}_cores", seconds / wall)
    ctx.note(f"{p}.cores", sum(used.values()) / wall)
    # CPU a stored event: the worker's, and every server's together
    ctx.note(f"{p}.worker_us_per_event", 1e6 * used["worker"] / len(envelopes))
    ctx.note(f"{p}.pg_us_per_event", 1e6 * sum(v for k, v in used.items() if k != "worker") / len(envelopes))
    ctx.note(f"{p}.load_1m", load)
    await _drop(a, b, urls)


async def _drop(a: PrivatePostgres, b: PrivatePostgres, urls: dict[str, str]) -> None:
    for server, shard in ((a, "default"), (b, "b")):
        if shard not in urls:
            continue
        conn = await asyncpg.connect(server.url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{urls[shard].rsplit("/", 1)[1]}" WITH (FORCE)')
        finally:
            await conn.close()


async def part_shards(ctx: Ctx) -> None:
    a, b = PrivatePostgres("a"), PrivatePostgres("b")
    try:
        await asyncio.gather(asyncio.to_thread(a.init), asyncio.to_thread(b.init))
        a.start()  # from this (the main) thread: the parent-death signal is the forking thread's
        b.start()
        await asyncio.gather(a.ready(), b.ready())
        n = ctx.opts.drain_events
        say(f"(shards) Postgres A on :{a.port}, B on :{b.port}; {WORKSPACES} workspaces, {n} events a case")
        for case in CASES:
            await _case(ctx, case, a, b)
    finally:
        a.stop()
        b.stop()
    f = ctx.figures
    ctx.note("shards.ratio", f["shards.two.events_per_s"] / f["shards.one.events_per_s"])
    line = {k.removeprefix("shards."): v for k, v in f.items() if k.startswith("shards.")}
    say("(shards) " + orjson.dumps({"run": ctx.run + 1, **line}).decode())
