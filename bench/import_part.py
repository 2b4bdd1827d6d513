"""Part (imp): a historical import beside live traffic.

An edge and the workers take seed 000 clicks at a steady open-loop rate; live
accept→commit latency (``processed_at - received_at`` of the live rows) is measured
without the import, then while ``refstream import`` brings ``--import-events`` rows of
history (clicks, leads naming them, sales; spread over the 20 days before today), then
without it again. The ratio is the p99 while importing over the mean of the two
baselines around it (the machine is shared: a baseline on each side brackets its drift).
Then the same file is imported a second time (``--share 1``, nothing live beside it): it
must store nothing.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import asyncpg
import orjson

from . import openloop
from . import requests as reqs
from .context import Ctx
from .pipeline_parts import _LATENCY, _all_groups, _drained, _until
from .procs import REFSTREAM
from .world import copy_database, warm

HISTORY_DAYS = 20
UA = "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"


def write_history(path: Path, codes: list[str], n: int, seed: int = 7) -> dict[str, int]:
    """``n`` rows in time order: seven clicks in ten, two leads naming earlier clicks, one
    sale of a lead's customer. The kinds written, counted."""
    rng = random.Random(seed)
    now_ms = int(time.time() * 1000)
    start = now_ms - HISTORY_DAYS * 86_400_000
    step = (HISTORY_DAYS - 1) * 86_400_000 // max(n, 1)
    kinds = {"click": 0, "lead": 0, "sale": 0}
    customers: list[str] = []
    clicks: list[int] = []
    with path.open("wb") as f:
        for i in range(n):
            at = start + i * step
            roll = rng.random()
            if roll < 0.7 or not clicks:
                clicks.append(i)
                row = {
                    "type": "click",
                    "id": f"c{i}",
                    "timestamp": at,
                    "link": codes[i % len(codes)],
                    "ip": f"198.51.{i % 250}.{(i // 250) % 250}",
                    "user_agent": UA,
                }
            elif roll < 0.9 or not customers:
                customer = f"cust{i}"
                customers.append(customer)
                click = rng.choice(clicks[-5000:])
                row = {
                    "type": "lead",
                    "id": f"l{i}",
                    "timestamp": at,
                    "click": f"c{click}",
                    "customer_id": customer,
                    "email": f"{customer}@example.com",
                }
            else:
                row = {
                    "type": "sale",
                    "id": f"s{i}",
                    "timestamp": at,
                    "customer_id": rng.choice(customers[-2000:]),
                    "amount": rng.randrange(500, 20_000),
                    "invoice_id": f"inv{i}",
                }
            kinds[str(row["type"])] += 1
            f.write(orjson.dumps(row) + b"\n")
    return kinds


async def _import(ctx: Ctx, env: dict[str, str], path: Path, *args: str) -> tuple[dict[str, object], float]:
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        REFSTREAM,
        "import",
        str(path),
        "--workspace",
        ctx.world.workspace_id,
        "--json",
        *args,
        env={**ctx.procs.env, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode not in (0, 3):  # 3: it read to the end, and refused some rows (counted in the summary)
        raise RuntimeError(f"refstream import failed ({proc.returncode}): {err.decode()[-1000:]}")
    return orjson.loads(out), time.monotonic() - t0


# what Postgres's client backends are doing, sampled: running (no wait event), waiting for a
# lock (by kind: ``transactionid``, a row another transaction wrote; ``advisory``, ...), for
# the WAL, for I/O
_WAITS = """
SELECT CASE WHEN wait_event_type = 'Lock' THEN 'lock_' || wait_event ELSE coalesce(wait_event_type, 'Running') END
       AS kind, count(*) AS n FROM pg_stat_activity
WHERE backend_type = 'client backend' AND state = 'active' AND pid <> pg_backend_pid()
GROUP BY 1
"""


class Waits:
    """The mean number of active backends per wait event type while ``sample`` runs."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.samples = 0
        self.totals: dict[str, int] = {}

    async def sample(self, stop: asyncio.Event, every_s: float = 0.02) -> None:
        conn = await asyncpg.connect(self.url)
        try:
            while not stop.is_set():
                for r in await conn.fetch(_WAITS):
                    self.totals[r["kind"]] = self.totals.get(r["kind"], 0) + r["n"]
                self.samples += 1
                await asyncio.sleep(every_s)
        finally:
            await conn.close()

    def means(self) -> dict[str, float]:
        return {k: v / max(self.samples, 1) for k, v in sorted(self.totals.items())}


async def _p99(conn: asyncpg.Connection, since: float, until: float) -> float:
    row = await conn.fetchrow(_LATENCY, since, until)
    return float(row["p99"] or 0.0) * 1000


async def part_imp(ctx: Ctx) -> None:
    keys = ctx.keys("imp")
    db = await copy_database(ctx.world, f"{ctx.world.database}_r{ctx.run}_imp")
    await warm(ctx.world, ctx.redis, keys, database=db)
    env = {"DATABASE_URL": ctx.world.url(db), "REFSTREAM_STREAM_PREFIX": keys.prefix}
    path = Path(ctx.procs.logdir).parent / f"history-{ctx.run}.ndjson"
    kinds = write_history(path, ctx.world.codes, ctx.opts.import_events)
    edge = ctx.procs.edge(**env)
    workers = [
        ctx.procs.refstream(f"imp-worker{i}", "work", REFSTREAM_CONSUMER_NAME=f"bench-imp-{ctx.run}-{i}", **env)
        for i in range(ctx.opts.workers)
    ]
    conn = await asyncpg.connect(ctx.world.url(db))
    requests = reqs.seed_000(ctx.world)
    rate, o = ctx.opts.import_live_rate, ctx.opts
    try:
        await _until("the workers to start", _all_groups(ctx, keys), 60, every=0.2)

        async def baseline(waits: Waits) -> float:
            start, done = time.time(), asyncio.Event()
            sampler = asyncio.create_task(waits.sample(done))
            try:
                await openloop.run(edge.base_url, requests, rate=rate, seconds=o.warmup + o.duration)
            finally:
                done.set()
                await sampler
            await _drained(ctx, keys)
            return await _p99(conn, start + o.warmup, start + o.warmup + o.duration)

        quiet, importing = Waits(ctx.world.url(db)), Waits(ctx.world.url(db))
        before = await baseline(quiet)
        stop = asyncio.Event()
        start = time.time()
        load = asyncio.create_task(openloop.run(edge.base_url, requests, rate=rate, seconds=86400, stop=stop))
        sampler = asyncio.create_task(importing.sample(stop))
        try:
            first, seconds = await _import(ctx, env, path, *ctx.opts.import_args)
        finally:
            stop.set()
            sent = await load
            await sampler
        end = time.time()
        await _drained(ctx, keys)
        during = await _p99(conn, start + min(o.warmup, seconds / 4), end)
        after = await baseline(Waits(ctx.world.url(db)))
        second, seconds2 = await _import(ctx, env, path, "--share", "1")  # no live load: as fast as it goes
        ctx.note("imp.rows", float(first["read"]))  # type: ignore[arg-type]
        ctx.note("imp.stored", float(first["stored"]))  # type: ignore[arg-type]
        ctx.note("imp.refused", float(first["refused_total"]))  # type: ignore[arg-type]
        ctx.note("imp.seconds", seconds)
        ctx.note("imp.rows_per_s", float(first["read"]) / seconds)  # type: ignore[arg-type]
        ctx.note("imp.waited_s", float(first["waited_s"]))  # type: ignore[arg-type]
        ctx.note("imp.rested_s", float(first["rested_s"]))  # type: ignore[arg-type]
        ctx.note("imp.behind", float(first["behind"]))  # type: ignore[arg-type]
        ctx.note("imp.share_low", float(first["share_low"]))  # type: ignore[arg-type]
        ctx.note("imp.live_floor_ms", float(first.get("live_floor_ms", 0)))  # type: ignore[arg-type]
        niced = first["backend_nice"]  # its Postgres backends reniced (of those it opened)
        ctx.note("imp.backends_reniced", float(niced["lowered"]) / max(float(niced["of"]), 1.0))  # type: ignore[index]
        ctx.note("imp.live_rate_per_s", sent.rate)
        ctx.note("imp.live_failed", sent.failed)
        ctx.note("imp.p99_before_ms", before)
        ctx.note("imp.p99_during_ms", during)
        ctx.note("imp.p99_after_ms", after)
        ctx.note("imp.p99_ratio", during / ((before + after) / 2) if before + after else 0.0)
        ctx.note("imp.second_stored", float(second["stored"]))  # type: ignore[arg-type]
        ctx.note("imp.second_duplicates", float(second["duplicates"]))  # type: ignore[arg-type]
        ctx.note("imp.second_rows_per_s", float(second["read"]) / seconds2)  # type: ignore[arg-type]
        for kind, n in kinds.items():
            ctx.note(f"imp.rows_{kind}", float(n))
        for phase, waits in (("before", quiet), ("during", importing)):  # mean backends in each state
            for kind, mean in waits.means().items():
                ctx.note(f"imp.backends_{kind.lower()}_{phase}", mean)
    finally:
        await conn.close()
        edge.stop()
        for w in workers:
            w.stop()
        path.unlink(missing_ok=True)
