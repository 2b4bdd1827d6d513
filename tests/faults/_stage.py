"""One scenario's world: its own key prefix and database on the suite's servers, the real
``refstream`` processes (edge, workers) that run on them, and the end of the scenario (the
drain, the invariants, the figure line).

Processes are started as the README runs them (``refstream migrate``, ``workspace create``,
``link create``, ``serve``, ``work``), with the environment of tests/_procs.py's env_for.
Workers get a consumer name of their own (``w1``, ``w2``, ...) so a test can see what each
holds; they are killed and replaced by pid, never by name.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import redis.asyncio as aioredis

from ingest.contract.keys import GROUP, Keys
from ingest.contract.settings import Settings

from .._procs import Procs
from ..conftest import SECRET_KEY
from ._checks import Checker, Figures
from ._load import Load
from ._plan import Plan
from ._sentinel import client as redis_client
from ._servers import PgServer

RUN = secrets.token_hex(3)
FIGURES: list[str] = []  # every scenario's figure line, for the terminal summary
_n = iter(range(1, 1_000_000))

# the edge must never be the bottleneck of a fault test: rate limits out of the way
EDGE_ENV = {"REFSTREAM_PUBLIC_RATE_LIMIT_PER_MIN": "100000000", "REFSTREAM_KEY_RATE_LIMIT_PER_MIN": "100000000"}
# workers: batches of 200, so that steady load makes many batches to break (block 200 ms,
# reclaim after 5 s idle, every second: set in Settings below, passed on by env_for)
WORKER_ENV = {"REFSTREAM_BATCH_SIZE": "200"}


@dataclass
class FaultEnd:
    """When the fault ended, and the measurement of the recovery that started then."""

    at: float
    recovery: asyncio.Task[tuple[float | None, list[str]]]


@dataclass
class World:
    workspace_id: str
    api_key: str
    program_id: str
    affiliate_id: str
    codes: list[str]


def codes_covering(keys: Keys, per_partition: int = 1, prefix: str = "c") -> list[str]:
    """Link codes, ``per_partition`` on each stream partition."""
    want = {p: per_partition for p in range(keys.partitions)}
    out: list[str] = []
    i = 0
    while any(want.values()):
        code = f"{prefix}{i}"
        p = keys.partition_for(code)
        if want[p]:
            want[p] -= 1
            out.append(code)
        i += 1
    return out


def code_on(keys: Keys, partition: int, prefix: str, start: int = 0) -> tuple[str, int]:
    i = start
    while keys.partition_for(f"{prefix}{i}") != partition:
        i += 1
    return f"{prefix}{i}", i + 1


class Stage:
    def __init__(
        self,
        name: str,
        pg: PgServer,
        redis_url: str,
        plan: Plan,
        check_url: str | None = None,
        *,
        cluster_arq_url: str | None = None,
        database_url: str | None = None,
    ) -> None:
        """``check_url``: where the test itself reads Redis, when the processes' ``redis_url``
        goes through something the test breaks (a proxy); a ``redis+sentinel://`` URL is read
        at the primary Sentinel names. ``cluster_arq_url``: ``redis_url`` is a node of a Redis
        Cluster, and arq's queue is on this plain Redis. ``database_url``: another way to
        ``pg`` (several hosts, say), with ``{database}`` where the stage's database goes."""
        n = next(_n)
        self.name = name
        self.pg = pg
        self.plan = plan
        self.tmp = Path(tempfile.mkdtemp(prefix=f"refstream-faults-{n}-"))
        self.database = f"faults_{RUN}_{n}"
        self.settings = Settings(
            redis_url=redis_url,
            database_url=database_url.format(database=self.database) if database_url else pg.url_for(self.database),
            stream_prefix=f"faults:{RUN}:{n}",
            partitions=4,
            block_ms=200,
            claim_idle_ms=5000,
            archive_segment_s=1.0,  # below the claim idle time (an archiver refuses otherwise)
            reclaim_every_s=1,
            click_rate_limit_per_min=100_000_000,
            secret_key=SECRET_KEY,
            spool_dir=str(self.tmp / "spool"),
            spool_drain_every_s=0.2,
            redis_cluster=cluster_arq_url is not None,
            arq_redis_url=cluster_arq_url,
        )
        self.keys = Keys(self.settings.stream_prefix, self.settings.partitions)
        self.procs = Procs(self.settings, self.tmp)
        cluster = cluster_arq_url is not None
        self.redis = redis_client(check_url or redis_url, timeout=10, cluster=cluster)
        self.check = Checker(
            self.settings.database_url,
            check_url or redis_url,
            self.keys,
            Path(self.settings.spool_dir),
            cluster=cluster,
        )
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.killed: set[int] = set()  # pids this test stopped on purpose
        self.base = ""
        self._w = 0

    # -- processes -------------------------------------------------------------------

    async def cli(self, *args: str, **env: str) -> Any:
        return await self.procs.cli(*args, **env)

    async def start_edge(self, **env: str) -> str:
        self.base = await self.procs.start_edge(**{**EDGE_ENV, **env})
        return self.base

    def start_worker(self, **env: str) -> str:
        """A `refstream work` process; returns its consumer name."""
        self._w += 1
        name = f"w{self._w}"
        self.workers[name] = self.procs.start(
            "work", **{**EDGE_ENV, **WORKER_ENV, "REFSTREAM_CONSUMER_NAME": name, **env}
        )
        return name

    def signal_worker(self, name: str, sig: int) -> subprocess.Popen[bytes]:
        proc = self.workers[name]
        self.killed.add(proc.pid)
        proc.send_signal(sig)
        return proc

    async def kill_worker(self, name: str, sig: int = signal.SIGKILL, timeout: float = 30) -> int:
        proc = self.signal_worker(name, sig)
        return await asyncio.to_thread(proc.wait, timeout)

    def alive(self) -> list[str]:
        return [n for n, p in self.workers.items() if p.poll() is None]

    def exited_by_themselves(self) -> list[str]:
        """Workers that ended without being told to: a worker never exits on an outage."""
        return [
            f"{n} (pid {p.pid}, exit {p.returncode})"
            for n, p in self.workers.items()
            if p.poll() is not None and p.pid not in self.killed
        ]

    async def groups_ready(self, timeout: float = 60) -> None:
        """Until the workers' group has a consumer on every partition (a worker reads it; an
        edge makes the group too, so its being there says nothing of the workers)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                ready = [
                    any(g["name"] == GROUP.encode() and g["consumers"] for g in await self.redis.xinfo_groups(s))
                    for s in self.keys.streams
                ]
            except aioredis.ResponseError:
                ready = [False]  # no stream yet
            if all(ready):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"no worker created its group within {timeout}s:\n{self.log_tail()}")
            await asyncio.sleep(0.05)

    async def consumer_pending(self, name: str) -> int:
        total = 0
        for stream in self.keys.streams:
            try:
                total += len(await self.redis.xpending_range(stream, GROUP, "-", "+", 10_000, consumername=name))
            except aioredis.ResponseError:
                continue
        return total

    async def holding(self, name: str, within: float) -> int:
        """Until worker ``name`` holds a batch (read, not acked) or ``within`` seconds pass;
        the entries it holds."""
        deadline = time.monotonic() + within
        while True:
            held = await self.consumer_pending(name)
            if held or time.monotonic() > deadline:
                return held
            await asyncio.sleep(0.002)

    async def mid_batch(self, timeout: float = 30) -> None:
        """Until some worker holds a batch it has read and not yet acked."""
        deadline = time.monotonic() + timeout
        while await self.check.pending() == 0:
            if time.monotonic() > deadline:
                raise AssertionError("no batch in flight to break")
            await asyncio.sleep(0.005)

    async def storing(self, at_least: int = 1, timeout: float = 60) -> None:
        """Until the pipeline has stored events (it works before the fault)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if await self.check.event_count() >= at_least:
                    return
            except (OSError, asyncpg.PostgresError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing stored within {timeout}s:\n{self.log_tail()}")
            await asyncio.sleep(0.1)

    # -- data ------------------------------------------------------------------------

    async def prepare(
        self,
        *,
        workers: int = 2,
        codes: list[str] | None = None,
        edge_env: dict[str, str] | None = None,
        **worker_env: str,
    ) -> World:
        """Migrate, a workspace, its links, the edge and ``workers`` workers."""
        await self.cli("migrate")
        codes = codes or codes_covering(self.keys)
        for _ in range(workers):
            self.start_worker(**worker_env)
        ws, base = await asyncio.gather(self.cli("workspace", "create", "Faults"), self.start_edge(**(edge_env or {})))
        first = await self.cli("link", "create", "--workspace", ws["workspace_id"], "--code", codes[0])
        world = World(ws["workspace_id"], ws["api_key"], first["program_id"], first["affiliate_id"], codes)
        await asyncio.gather(
            *(
                self.api(
                    "POST",
                    "/v1/links",
                    {"affiliate_id": world.affiliate_id, "code": c, "url": f"https://shop.test/{c}"},
                    world,
                )
                for c in codes[1:]
            )
        )
        assert base
        return world

    async def api(self, method: str, path: str, body: Any, world: World) -> Any:
        """The management API, with the workspace key."""
        async with (
            aiohttp.ClientSession() as http,
            http.request(
                method, self.base + path, json=body, headers={"Authorization": f"Bearer {world.api_key}"}
            ) as r,
        ):
            out = orjson.loads(await r.read())
            assert r.status in (200, 201), (path, r.status, out)
            return out

    def load(self, world: World, *, rate: float | None = None, **kw: Any) -> Load:
        rate = self.plan.rate if rate is None else rate
        return Load(self.base, world.codes, rate=rate, api_key=world.api_key, **kw)

    # -- the end ---------------------------------------------------------------------

    async def fault_over(self) -> FaultEnd:
        """Call the moment the fault ends: the recovery is timed from here, until everything
        appended before now is committed and acked (the load may go on)."""
        at = time.monotonic()
        target = await self.check.last_ids()
        return FaultEnd(at, asyncio.create_task(self.check.wait_caught_up(at, target, self.plan.drain_timeout_s)))

    async def finish(
        self,
        scenario: str,
        accepted: dict[str, str],
        *,
        fault_end: FaultEnd,
        refused: int = 0,
        planted_dead: AbstractSet[tuple[str, str]] = frozenset(),
        problems: list[str] | None = None,
        recover_bound: float | None = None,
    ) -> Figures:
        """Wait for the drain, check the invariants, print the figure line, fail on any
        violation (all of them listed)."""
        __tracebackhide__ = True
        figures = Figures(scenario, refused=refused, problems=list(problems or []))
        recover, left = await fault_end.recovery
        figures.recover_s = recover
        if recover is None:
            figures.problems.append(f"not recovered {self.plan.drain_timeout_s:.0f}s after the fault: {left[:6]}")
        elif recover > (recover_bound or self.plan.recover_s):
            figures.problems.append(
                f"recovered in {recover:.1f}s, over the {recover_bound or self.plan.recover_s}s bound"
            )
        # and then everything, the load's tail included: the state the invariants are checked in
        patience = self.plan.drain_timeout_s if recover is not None else 5.0  # stuck already: say so soon
        drained, left = await self.check.wait_drained(time.monotonic(), patience)
        if drained is None:
            figures.problems.append(f"not drained within {patience:.0f}s: {left[:6]}")
        figures.problems.extend(f"worker exited by itself: {w}" for w in self.exited_by_themselves())
        await self.check.verify(figures, accepted, planted_dead=planted_dead)
        line = figures.line(self.plan.mode) + (
            f" FAILED ({len(figures.problems)} violations)" if figures.problems else ""
        )
        FIGURES.append(line)
        print("\n" + line, flush=True)
        if figures.problems:
            raise AssertionError(
                f"{scenario}: {len(figures.problems)} invariant violation(s):\n  - "
                + "\n  - ".join(figures.problems[:25])
                + f"\n{figures.line(self.plan.mode)}\nworker log excerpts:\n{self.log_tail()}"
            )
        return figures

    def log_tail(self, lines: int = 12) -> str:
        """The last warnings and errors of each process: what it made of the fault."""
        out = []
        for path in sorted(self.tmp.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()
            loud = [ln[:300] for ln in text if '"level":"info"' not in ln and '"level": "info"' not in ln]
            out.append(f"== {path.name} ({len(text)} lines)\n" + "\n".join(loud[-lines:]))
        return "\n".join(out)

    async def close(self) -> None:
        """Stop this test's processes (by pid), restore the Postgres, drop the database,
        delete the keys and the temp directory."""
        await asyncio.to_thread(self.procs.stop_all)
        await self.check.close()
        if not self.pg.running:
            self.pg.start()
            await self.pg.ready()
        await self.pg.set_read_only(False)
        conn = await asyncpg.connect(self.pg.url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        finally:
            await conn.close()
        try:
            async for key in self.redis.scan_iter(match=f"{self.settings.stream_prefix}:*", count=1000):
                await self.redis.delete(key)
        except (OSError, aioredis.RedisError):
            pass  # a Redis of the test's own, gone already
        await self.redis.aclose()
        if os.environ.get("REFSTREAM_FAULTS_KEEP"):
            print(f"\nfault suite: logs kept in {self.tmp}", flush=True)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
