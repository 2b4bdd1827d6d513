"""Part (con), not in the default set: what ten open consoles cost the pipeline. The issue
asks that they add at most 2 % to the edge's and the worker's CPU at (e)'s half load.

One edge, one worker and a ``refstream console`` (the operator's token in its
environment, reading the same prefix and database) on a fresh copy of the world's
database. (e)'s full load first (wrk, seed 000; the lower of accepted/s and committed/s,
as (e) takes it), then seed 000 clicks open loop at half of it for the rest of the part
(``--con-rate`` gives that rate instead and skips the full load: ``--quick`` runs 200/s).
Under that load, windows without consoles (``off``) and with ten (``on``) alternate, off,
on, off, on, …, off, so the machine's own drift shows and each ``on`` is set against the
mean of the two ``off`` around it (a drift in one direction cancels). Each window's CPU of
the edge, the worker and the console is utime + stime from ``/proc/<pid>/stat`` (children
included), as in (cap); its events are the generator's 2xx answered in it and the rows it
added to ``events``; and the 1-minute load average at its end, since the machine is shared.

The ten consoles are a process of their own (``python -m bench.console_part``), as
browsers are: in the bench's process their requests would change the load generator's
timing, and with it the edge's cost per request. Each is what a browser on its page asks
for: the page, its stylesheet, icon and scripts once when it opens, then the page's own
polls at its own interval, one call at a time, ticks missed while a call runs skipped
(``every`` in ``static/common.js``), the token as a Bearer header: pipeline
``/api/pipeline?since=<the last sample's at_ms>`` every 2 s, tail ``/api/tail`` every
0.75 s, erasures ``/api/erasures`` every 10 s; dead letters ``/api/dead`` and replay
``/api/replay`` once on opening (those pages call again only on an action). Ten: 4
pipeline, 3 tail, 1 dead, 1 erasures, 1 replay, the first polls of a page's consoles
spread over its interval. They open (every page loaded) before an ``on`` window's settling
time and close after the window. The console process runs in both conditions: its sampler
reads Redis and Postgres every 2 s whether or not a page is open.
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import uvloop

from refstream.embedded import free_port

from . import openloop
from . import requests as reqs
from .cap_meter import Meter
from .context import Ctx, say
from .pipeline_parts import _all_groups, _drained, _until
from .procs import REFSTREAM, Proc
from .world import copy_database, warm
from .wrk import proc_cpu_seconds

# page -> (consoles open on it, its poll's path, its interval in seconds; None: once on opening)
PAGES: dict[str, tuple[int, str, float | None]] = {
    "pipeline": (4, "/api/pipeline", 2.0),
    "tail": (3, "/api/tail", 0.75),
    "dead": (1, "/api/dead", None),
    "erasures": (1, "/api/erasures", 10.0),
    "replay": (1, "/api/replay", None),
}
# edge, worker, console; Redis (INFO cpu: the bench's Redis, other clients' work included),
# Postgres (the backends of the part's database: the console's queries land there) and its
# background processes (the whole server's); the bench's own process (the load generator:
# CPU it lacks is load not sent) and the ten consoles' process (browsers, 0 when off)
PROCS = ("edge", "worker", "console", "redis", "pg", "pg_bg", "generator", "browsers")
QUICK_WINDOW_S = 3.0  # a pipeline poll at least, when --duration is short (--quick)
_ASSET = re.compile(r'/static/[a-z]+\.(?:js|css|svg)|from "\./([a-z]+\.js)"')


@dataclass(slots=True)
class Calls:
    """What the simulated consoles asked of the console, and how many answers were not 200."""

    made: int = 0
    failed: int = 0


@dataclass(slots=True)
class Browser:
    """One open page: its assets once, then its polls until ``stop``."""

    base: str
    page: str
    token: str
    offset_s: float
    calls: Calls
    stop: asyncio.Event
    since: int = 0  # the pipeline page's last sample, as the page keeps it
    seen: set[str] = field(default_factory=set)
    loaded: asyncio.Event = field(default_factory=asyncio.Event)

    async def get(self, http: aiohttp.ClientSession, path: str, *, api: bool) -> bytes:
        headers = {"Accept": "application/json", "Authorization": f"Bearer {self.token}"} if api else {}
        self.calls.made += 1
        try:
            async with http.get(self.base + path, headers=headers) as r:
                body = await r.read()
                if r.status == 200:
                    return body
        except (TimeoutError, aiohttp.ClientError):  # the page says "could not read" and polls on
            pass
        self.calls.failed += 1
        return b""

    async def load(self, http: aiohttp.ClientSession, path: str) -> None:
        """A page or an asset, then what it links to or imports (each once)."""
        self.seen.add(path)
        body = (await self.get(http, path, api=False)).decode(errors="replace")
        for m in _ASSET.finditer(body):
            ref = f"/static/{m.group(1)}" if m.group(1) else m.group(0)
            if ref not in self.seen:
                await self.load(http, ref)

    async def poll(self, http: aiohttp.ClientSession) -> None:
        _, path, _ = PAGES[self.page]
        if self.page == "pipeline":
            body = await self.get(http, f"{path}?since={self.since}", api=True)
            self.since = _last_sample(body, self.since)
        else:
            await self.get(http, path, api=True)

    async def run(self, http: aiohttp.ClientSession) -> None:
        await self.load(http, f"/{self.page}")
        every = PAGES[self.page][2]
        if every is None:  # the dead letters' and replay's pages call once, and again only on an action
            await self.poll(http)
        self.loaded.set()
        if every is None or await self._stopped(self.offset_s):  # opened at another moment than its neighbours
            await self.stop.wait()
            return
        start = time.monotonic()
        while True:
            await self.poll(http)
            ticks = int((time.monotonic() - start) / every) + 1  # a tick missed while busy is skipped
            if await self._stopped(start + ticks * every - time.monotonic()):
                return

    async def _stopped(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self.stop.wait(), max(0.0, seconds))
        except TimeoutError:
            return False
        return True


def _last_sample(body: bytes, since: int) -> int:
    """The ``at_ms`` of the last sample of a ``/api/pipeline`` answer (``since`` if none)."""
    try:
        samples = orjson.loads(body).get("samples") or []
    except (orjson.JSONDecodeError, AttributeError):
        return since
    return int(samples[-1]["at_ms"]) if samples else since


async def browse(base: str, token: str, out: Path) -> None:
    """Ten open consoles (``PAGES``) until SIGTERM, each a task of this process. ``out``
    gets ``{"ready": true}`` once every page has loaded, and at the end the polls made
    since then, the seconds they took and every answer that was not a 200."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    calls = Calls()
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, skip_auto_headers=["User-Agent"]) as http:
        browsers = [
            Browser(base, page, token, (every or 1.0) * i / n, calls, stop)  # the same page's first polls spread
            for page, (n, _, every) in PAGES.items()
            for i in range(n)
        ]
        tasks = [asyncio.create_task(b.run(http)) for b in browsers]
        await asyncio.gather(*(b.loaded.wait() for b in browsers))
        loads, ready = calls.made, time.monotonic()
        _write(out, {"ready": True})
        await stop.wait()
        await asyncio.gather(*tasks)
        seconds = time.monotonic() - ready
    _write(out, {"ready": True, "polls": calls.made - loads, "seconds": seconds, "failed": calls.failed})


def _write(path: Path, data: dict[str, Any]) -> None:
    """Whole or not at all: the bench reads the file while this process runs."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(data))
    tmp.replace(path)


class Consoles:
    """The ten consoles' process (``python -m bench.console_part``), started for one window."""

    def __init__(self, ctx: Ctx, base: str, token: str, n: int) -> None:
        self.out = ctx.procs.logdir / f"consoles-{ctx.run}-{n}.json"
        argv = [sys.executable, "-m", "bench.console_part", base, str(self.out)]
        self.proc = ctx.procs.start("consoles", argv, REFSTREAM_CONSOLE_TOKEN=token)
        self.ctx = ctx

    def _read(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = orjson.loads(self.out.read_bytes())
        except FileNotFoundError:
            return {}
        return data

    async def opened(self) -> None:
        """Every page loaded (its assets, and the dead and replay pages' one call)."""

        async def ready() -> bool:
            if not self.proc.alive():
                raise RuntimeError(f"the consoles exited: {self.ctx.procs.tail('consoles')}")
            return bool(self._read().get("ready"))

        await _until("the ten consoles to open", ready, 60, every=0.05)

    async def close(self) -> dict[str, Any]:
        """Polls made while open, over how many seconds, and answers that were not 200."""
        await asyncio.to_thread(self.proc.stop)
        data = self._read()
        if "polls" not in data:
            raise RuntimeError(f"the consoles said nothing at exit: {self.ctx.procs.tail('consoles')}")
        return data


def _console(ctx: Ctx, token: str, **env: str) -> Proc:
    """``refstream console`` on a free port; ready once ``/api/access`` answers."""
    port = free_port()
    argv = [REFSTREAM, "console", "--port", str(port)]
    return ctx.procs.start_server("console", argv, port, REFSTREAM_CONSOLE_TOKEN=token, **env)


async def _ready(ctx: Ctx, console: Proc) -> None:
    async def up() -> bool:
        if not console.alive():
            raise RuntimeError(f"console exited with {console.popen.returncode}: {ctx.procs.tail('console')}")
        try:
            async with aiohttp.ClientSession() as http, http.get(console.base_url + "/api/access") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    await _until("the console to answer", up, 60, every=0.1)


@dataclass(slots=True)
class Window:
    """One measured window: its condition, its bounds (monotonic), each process's CPU
    seconds over it, the rows it added to ``events``; with consoles, the polls they made
    over the seconds they were open, and their answers that were not 200."""

    on: bool
    t0: float
    t1: float
    cpu: dict[str, float]
    stored: int
    load_1m: float
    polls: int = 0
    poll_s: float = 0.0
    failed: int = 0


def _cpu(console: Proc, browsers: Proc | None) -> dict[str, float]:
    """CPU seconds of the processes (cap)'s ``Meter`` does not read."""
    own = resource.getrusage(resource.RUSAGE_SELF)  # this process alone, its children apart
    return {
        "console": proc_cpu_seconds(console.pid),
        "generator": own.ru_utime + own.ru_stime,
        "browsers": proc_cpu_seconds(browsers.pid) if browsers is not None else 0.0,
    }


async def _measure(ctx: Ctx, seconds: float, procs: dict[str, Proc], browsers: Proc | None, db_url: str) -> Window:
    """One window: (cap)'s ``Meter`` for the edge, the worker, Redis and Postgres, and the rest."""
    conn = await asyncpg.connect(db_url)
    try:
        m = Meter([procs["edge"]], [procs["worker"]], ctx.redis, db_url, conn.get_server_pid())
        rows0 = int(await conn.fetchval("SELECT count(*) FROM events"))
        await m.start()
        cpu0, t0 = _cpu(procs["console"], browsers), time.monotonic()
        await asyncio.sleep(seconds)
        cpu1, t1 = _cpu(procs["console"], browsers), time.monotonic()
        cpu = {**(await m.stop()), **{k: cpu1[k] - cpu0[k] for k in cpu0}}
        rows1 = int(await conn.fetchval("SELECT count(*) FROM events"))
    finally:
        await conn.close()
    return Window(browsers is not None, t0, t1, {k: cpu[k] for k in PROCS}, rows1 - rows0, os.getloadavg()[0])


def _plan(duration: float) -> tuple[float, int, float]:
    """(window seconds, windows with consoles, settling seconds before each window): 4 of
    ``--duration`` seconds, or 2 of 3 s when it is short (``--quick``)."""
    if duration < 5:
        return max(duration, QUICK_WINDOW_S), 2, 1.0
    return duration, 4, 2.0


async def _full_rate(ctx: Ctx, edge: Proc, conn: asyncpg.Connection) -> float:
    """(e)'s full load: wrk on seed 000; the lower of accepted/s and committed/s meanwhile."""
    mark: list[tuple[int, float]] = []

    async def count() -> None:
        mark.append((int(await conn.fetchval("SELECT count(*) FROM events")), time.monotonic()))

    requests = reqs.seed_000(ctx.world)
    o = ctx.opts
    await ctx.wrk("con_full", edge.base_url, requests, connections=o.connections, server_pid=edge.pid, on_start=count)
    await count()
    (n0, t0), (n1, t1) = mark
    committed = (n1 - n0) / (t1 - t0)
    sustained = min(ctx.figures["con_full.rps"], committed)
    ctx.note("con_full.committed_per_s", committed)
    ctx.note("con_full.sustained_per_s", sustained)
    return sustained


def _note(ctx: Ctx, windows: list[Window], answered_at: list[float]) -> None:
    """Each window's figures, each condition's over all its windows, what each window with
    consoles added against the mean of the two without around it (a drift of the machine
    in one direction cancels), and on / off - 1 over all of them."""

    def accepted(w: Window) -> int:
        return sum(1 for at in answered_at if w.t0 <= at < w.t1)

    def figures(name: str, ws: list[Window]) -> dict[str, float]:
        seconds = sum(w.t1 - w.t0 for w in ws)
        poll_s = sum(w.poll_s for w in ws)
        out = {f"{k}_cores": sum(w.cpu[k] for w in ws) / seconds for k in PROCS}
        out["accepted_per_s"] = sum(accepted(w) for w in ws) / seconds
        out["stored_per_s"] = sum(w.stored for w in ws) / seconds
        out["calls_per_s"] = sum(w.polls for w in ws) / poll_s if poll_s else 0.0
        for k, v in out.items():
            ctx.note(f"con.{name}.{k}", v)
        return out

    def added(on: float, off: float) -> float:
        return on / off - 1 if off else 0.0

    offs, ons = [w for w in windows if not w.on], [w for w in windows if w.on]
    by_off = [figures(f"off{n}", [w]) for n, w in enumerate(offs, 1)]
    for n, w in enumerate(ons, 1):
        b = figures(f"on{n}", [w])
        for k in ("edge", "worker"):
            around = (by_off[n - 1][f"{k}_cores"] + by_off[n][f"{k}_cores"]) / 2
            ctx.note(f"con.pair{n}.{k}_added", added(b[f"{k}_cores"], around))
    off, on = figures("off", offs), figures("on", ons)
    for k, per in (("edge", "accepted_per_s"), ("worker", "stored_per_s")):
        ctx.note(f"con.{k}_added", added(on[f"{k}_cores"], off[f"{k}_cores"]))
        # per event (the edge's per accepted, the worker's per stored): for loads that differ
        if on[per] and off[per]:
            ctx.note(f"con.{k}_added_per_event", added(on[f"{k}_cores"] / on[per], off[f"{k}_cores"] / off[per]))
    # the CPU figures compare like with like only if the load held: clicks answered, on / off
    ctx.note("con.load_held", on["accepted_per_s"] / off["accepted_per_s"] if off["accepted_per_s"] else 0.0)
    ctx.note("con.console_added_cores", on["console_cores"] - off["console_cores"])
    # the console's own added CPU, as a share of what the edge and the worker use without consoles
    pipeline = off["edge_cores"] + off["worker_cores"]
    ctx.note("con.console_added_share", (on["console_cores"] - off["console_cores"]) / pipeline if pipeline else 0.0)
    ctx.note("con.window_s", windows[0].t1 - windows[0].t0)
    ctx.note("con.pairs", len(ons))
    ctx.note("con.console_failed", sum(w.failed for w in ons))
    ctx.note("con.load_1m", sum(w.load_1m for w in windows) / len(windows))


async def part_con(ctx: Ctx) -> None:
    """(con) the edge's and the worker's CPU at (e)'s half load without consoles and with ten."""
    o = ctx.opts
    keys = ctx.keys("con")
    db = await copy_database(ctx.world, f"{ctx.world.database}_r{ctx.run}_con")
    await warm(ctx.world, ctx.redis, keys, database=db)
    env = {"DATABASE_URL": ctx.world.url(db), "REFSTREAM_STREAM_PREFIX": keys.prefix}
    token = secrets.token_urlsafe(24)
    edge = ctx.procs.start_edge(**env)
    worker = ctx.procs.refstream("worker-con", "work", REFSTREAM_CONSUMER_NAME=f"bench-{ctx.run}-con", **env)
    console = _console(ctx, token, **env)
    procs = {"edge": edge, "worker": worker, "console": console}
    conn = await asyncpg.connect(env["DATABASE_URL"])
    window_s, pairs, settle_s = _plan(o.duration)
    consoles: Consoles | None = None
    try:
        ctx.procs.healthy(edge)
        await _ready(ctx, console)
        await _until("the worker to start", _all_groups(ctx, keys), 60, every=0.2)
        if o.con_rate is None:  # (e)'s half load, measured here
            rate = await _full_rate(ctx, edge, conn) / 2
            await _drained(ctx, keys)
        else:  # a load given (--con-rate; --quick: a small one, so a smoke run's backlog stays small)
            rate = o.con_rate
        say(f"(con) {rate:.0f} clicks/s through {2 * pairs + 1} windows of {window_s:.0f} s")

        # half load, open loop, through every window; each 2xx counted in the window it was answered in
        requests = reqs.seed_000(ctx.world)
        stop = asyncio.Event()
        answered: list[tuple[float, float]] = []  # (seconds from the start when sent, seconds to the answer)
        started = time.monotonic()
        load = asyncio.create_task(
            openloop.run(edge.base_url, requests, rate=rate, seconds=86400, stop=stop, latencies=answered)
        )
        windows: list[Window] = []
        try:
            await asyncio.sleep(o.warmup)
            for n in range(2 * pairs + 1):  # off, on, off, on, …, off
                if n % 2:
                    consoles = Consoles(ctx, console.base_url, token, n)
                    await consoles.opened()
                await asyncio.sleep(settle_s)  # the pages' first polls (on), the last ones answered (off)
                w = await _measure(ctx, window_s, procs, consoles.proc if consoles else None, env["DATABASE_URL"])
                if consoles is not None:
                    said = await consoles.close()
                    consoles = None
                    w.polls, w.poll_s, w.failed = int(said["polls"]), float(said["seconds"]), int(said["failed"])
                windows.append(w)
                say(f"(con) window {n + 1}: {'on' if w.on else 'off'}, {w.stored} stored")
        finally:
            stop.set()
            sent = await load
        await _drained(ctx, keys)
        say("(con) drained")
        ctx.note("con.rate_per_s", rate)
        ctx.note("con.failed", sent.failed)
        ctx.note("con.consoles", sum(n for n, _, _ in PAGES.values()))
        _note(ctx, windows, [started + sent_s + took_s for sent_s, took_s in answered])
    finally:
        if consoles is not None:
            consoles.proc.stop()
        await conn.close()
        for p in procs.values():
            p.stop()


def main() -> None:
    """``python -m bench.console_part BASE_URL OUT``: the ten consoles, the operator's
    token from ``REFSTREAM_CONSOLE_TOKEN``."""
    base, out = sys.argv[1], Path(sys.argv[2])
    uvloop.run(browse(base, os.environ["REFSTREAM_CONSOLE_TOKEN"], out))


if __name__ == "__main__":
    main()
