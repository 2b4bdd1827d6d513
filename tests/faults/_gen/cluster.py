"""One seed's world: its Redis (one server behind proxies, or a primary, a replica and a
Sentinel with the edges at ``replicas:1``), proxies on the processes' links to Postgres, a
``Stage`` (its own database, key prefix, spool and archive directories), and two of each
process: edges, workers, archivers, each in a slot that a fault may empty, stop or refill.

Two Postgres primaries: the suite's (shard ``default``, the stage's database, which is the
directory) and shard ``b``'s (``shard_pg``: the stage's database name on a server of the
test's own, added with ``refstream shards add``); workspaces ``a`` and ``b`` are made on the
shards the schedule placed them on (``Schedule.placed``), and the stage's checker reads
every shard (``shards.ShardedChecker``).

Links and who uses them:
- ``edge-redis`` / ``worker-redis`` (single topology): the edges', and the workers' and
  archivers', way to Redis; Sentinel's topology has none (its clients ask Sentinel);
- ``edge-pg`` / ``worker-pg``: their ways to Postgres (``default``'s; shard ``b`` is reached
  at the DSN the directory holds, straight).
The checks and the CLI commands go straight to the servers.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from workers.archive.archiver import GROUP as ARCHIVE

from ..._procs import env_for, free_port, run_command
from ..._proxy import Proxy
from .._plan import Plan
from .._sentinel import MASTER, SentinelServer, wait_in_sync
from .._servers import FaultRedis, PgServer
from .._stage import EDGE_ENV, Stage, codes_covering
from .._stage import World as StageWorld
from . import cases
from .ops import B_ORIGINS, COMMISSION, DUB_DOMAIN, World
from .shards import ShardedChecker

AOF = ("--appendonly", "yes", "--appendfsync", "always")  # a killed Redis keeps what it acknowledged
SEGMENTS = {"REFSTREAM_ARCHIVE_SEGMENT_ENTRIES": "150", "REFSTREAM_ARCHIVE_SEGMENT_S": "0.5"}
PER_ROLE = 2
# every client is the one address: Dub's click route's own limit per address (120 a minute by
# default) would refuse a seed's clicks, as the other routes' would
DUB_CLICK_ENV = {"REFSTREAM_TRACK_CLICK_RATE_LIMIT_PER_MIN": "100000000"}
DUB_LINK = "dubdomain"  # the one link with a domain (ops.DUB_DOMAIN)


SUPERVISED_EDGE = 1  # the edge slot run as `serve --processes 2` (the other runs one process, no supervisor)


@dataclass
class Slot:
    role: str
    index: int
    proc: subprocess.Popen[bytes] | None = None
    name: str = ""
    base: str = ""  # an edge's URL
    extra: dict[str, str] = field(default_factory=dict)  # env beyond the role's (a clock offset)
    stopped: bool = False  # SIGSTOPped


class Cluster:
    def __init__(
        self, name: str, pg: PgServer, topology: str, plan: Plan, shard_pg: PgServer, placed: dict[str, str]
    ) -> None:
        """``shard_pg``: the Postgres of shard ``b`` (``shards.py``); ``placed``: each
        workspace's shard at the start, by tag (``a``, ``b``)."""
        self.name, self.pg, self.topology, self.plan = name, pg, topology, plan
        self.shard_pg = shard_pg
        self.placed = dict(placed)  # where each workspace is now, by tag (a move's fault keeps it)
        self.frozen: dict[str, str] = {}  # tag -> the shard holding its old copy (no --drop-old since)
        self.workspaces: dict[str, str] = {}  # tag -> workspace id
        self.shards: Counter[str] = Counter()  # moved, dropped, outages, move-retries (``faults.py``)
        self.move_errors: list[str] = []  # each failed run of a move's command, a line
        self.servers: list[FaultRedis] = []
        self.sentinel: SentinelServer | None = None
        self.proxies: dict[str, Proxy] = {}
        self.stage: Stage | None = None
        self.slots: dict[str, list[Slot]] = {
            r: [Slot(r, i) for i in range(PER_ROLE)] for r in ("edge", "worker", "archiver")
        }
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []  # every process, for its exit check
        self.killed: set[int] = set()
        self._gen = 0

    # -- servers ---------------------------------------------------------------------

    async def _redis(self) -> str:
        primary = FaultRedis(*AOF)
        self.servers.append(primary)
        primary.start()
        await primary.ready()
        if self.topology == "single":
            for link in ("edge-redis", "worker-redis"):
                self.proxies[link] = Proxy(primary.port)
            return primary.url
        replica = FaultRedis(*AOF, "--replicaof", "127.0.0.1", str(primary.port))
        self.servers.append(replica)
        replica.start()
        await replica.ready()
        await wait_in_sync(primary, 1)
        self.sentinel = SentinelServer(primary, primary.port, down_after_ms=1000)
        self.sentinel.start()
        await self.sentinel.wait_master(primary.port)
        await self.sentinel.wait_replicas(1)
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{MASTER}/0"

    async def primary(self) -> FaultRedis:
        """The server that is the primary now (Sentinel's word in its topology)."""
        if self.sentinel is None:
            return self.servers[0]
        port = await self.sentinel.master_port()
        return next((s for s in self.servers if s.port == port), self.servers[0])

    async def restart_redis(self, server: FaultRedis) -> None:
        """Start a stopped server on its port and data; in Sentinel's topology as a replica of
        the primary Sentinel names now, unless that is this server itself."""
        if self.sentinel is not None:
            port = await self.sentinel.master_port()
            opts = list(server.options)
            if "--replicaof" in opts:
                i = opts.index("--replicaof")
                del opts[i : i + 3]
            server.options = tuple(
                opts if port in (None, server.port) else [*opts, "--replicaof", "127.0.0.1", str(port)]
            )
        server.start()
        await server.ready()

    async def settle(self, timeout: float = 90) -> None:
        """Until the server Sentinel names the primary is one, with the other its replica in
        sync. Sentinel puts a returning server in its place by itself; past 15 s without it
        (a restart raced a failover, and the two disagree with Sentinel), an operator's hand:
        REPLICAOF to agree with Sentinel."""
        assert self.sentinel is not None
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            primary = await self.primary()
            roles = {}
            for server in self.servers:
                try:
                    async with self.admin(server) as r:
                        roles[server.port] = await r.info("replication")
                except (RedisError, OSError):
                    roles[server.port] = {}
            mine = roles[primary.port]
            if mine.get("role") == "master" and mine.get("connected_slaves", 0) >= 1:
                await wait_in_sync(primary, 1)
                return
            if loop.time() - start > timeout:
                raise AssertionError(f"Redis never agreed with Sentinel (primary {primary.port}): {roles}")
            if loop.time() - start > 15:
                for server in self.servers:
                    async with self.admin(server) as r:
                        if server is primary and roles[server.port].get("role") != "master":
                            await r.execute_command("REPLICAOF", "NO", "ONE")
                        elif server is not primary and roles[server.port].get("master_port") != primary.port:
                            await r.execute_command("REPLICAOF", "127.0.0.1", str(primary.port))
            await asyncio.sleep(0.2)

    def admin(self, server: FaultRedis) -> aioredis.Redis:
        return aioredis.Redis(port=server.port, socket_timeout=5)

    # -- processes -------------------------------------------------------------------

    @property
    def st(self) -> Stage:
        assert self.stage is not None
        return self.stage

    def env(self, role: str) -> dict[str, str]:
        st = self.st
        env = {**EDGE_ENV, **DUB_CLICK_ENV, "REFSTREAM_ARCHIVE_URL": f"file://{st.tmp / 'archive'}", **SEGMENTS}
        near = "edge" if role == "edge" else "worker"
        if f"{near}-redis" in self.proxies:
            env["REDIS_URL"] = self.proxies[f"{near}-redis"].url
        env["DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{self.proxies[f'{near}-pg'].port}/{st.database}"
        if self.sentinel is not None:  # one setting for every process, as a deployment has it
            env["REFSTREAM_ACK_DURABILITY"] = "replicas:1"
        if role == "worker":
            env["REFSTREAM_BATCH_SIZE"] = "200"
        return env

    async def start(self, role: str, index: int, **extra: str) -> Slot:
        """A new process in the slot (whatever was there must be gone)."""
        slot = self.slots[role][index]
        slot.extra, slot.stopped = dict(extra), False
        self._gen += 1
        env = {**self.env(role), **extra}
        if role == "edge" and index == SUPERVISED_EDGE:
            env["REFSTREAM_PROCESSES"] = "2"  # a supervisor and two processes: what a take-over replaces
        if role == "worker":
            slot.name = self.st.start_worker(**env)
            slot.proc = self.st.workers[slot.name]
        elif role == "archiver":
            slot.name = f"a{self._gen}"
            slot.proc = self.st.procs.start("archive", REFSTREAM_CONSUMER_NAME=slot.name, **env)
        else:
            for attempt in range(5):
                port = free_port()  # free when asked, maybe not when bound: another port then
                slot.name, slot.base = f"e{self._gen}", f"http://127.0.0.1:{port}"
                slot.proc = self.st.procs.start("serve", "--port", str(port), **env)
                try:
                    await self._healthy(slot)
                    break
                except AssertionError as exc:
                    if attempt == 4 or f"port {port} on 127.0.0.1 is in use" not in str(exc):
                        raise
                    self._gen += 1
        assert slot.proc is not None  # the loop ends with a process started, or raises
        self.started.append((f"{role} {slot.name}", slot.proc))
        return slot

    async def _healthy(self, slot: Slot, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while True:
                assert slot.proc is not None
                if slot.proc.poll() is not None:
                    raise AssertionError(f"edge {slot.name} exited with {slot.proc.returncode}:\n{self.st.log_tail()}")
                try:
                    async with http.get(slot.base + "/healthz") as r:
                        if r.status == 200:
                            return
                except (TimeoutError, aiohttp.ClientError):
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"edge {slot.name} not healthy within {timeout}s")
                await asyncio.sleep(0.05)

    def send(self, slot: Slot, sig: int) -> None:
        assert slot.proc is not None
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.killed.add(slot.proc.pid)
            self.st.killed.add(slot.proc.pid)
        slot.proc.send_signal(sig)
        if sig == signal.SIGSTOP:
            slot.stopped = True
        elif sig == signal.SIGCONT:
            slot.stopped = False

    async def end(self, slot: Slot, sig: int = signal.SIGTERM) -> None:
        """Stop the slot's process (SIGTERM drains; SIGKILL does not) and wait for its exit."""
        if slot.proc is None or slot.proc.poll() is not None:
            return
        if slot.stopped:
            self.send(slot, signal.SIGCONT)
        self.send(slot, sig)
        try:
            await asyncio.to_thread(slot.proc.wait, 30)
        except subprocess.TimeoutExpired:
            self.send(slot, signal.SIGKILL)
            await asyncio.to_thread(slot.proc.wait, 10)

    async def take_over(self, slot: Slot, timeout: float = 180) -> str:
        """``refstream serve --take-over`` on an edge slot's port, as an operator rolls the
        supervisor itself: the new one takes the old one's sockets, serves, and the old one
        drains and exits. The old process's name. ``timeout``: past what a starved machine
        takes (the new supervisor's children took 37 s to start at a load average of 20,
        beside a clean-clone install and three other test runs: seed 1567608730)."""
        assert slot.proc is not None and slot.base
        old, old_name = slot.proc, slot.name
        self.killed.add(old.pid)  # it exits on purpose
        self.st.killed.add(old.pid)
        self._gen += 1
        env = {**self.env("edge"), **slot.extra, "REFSTREAM_PROCESSES": "2"}
        new = self.st.procs.start("serve", "--port", slot.base.rsplit(":", 1)[1], "--take-over", **env)
        self.started.append((f"edge e{self._gen} (took over {old_name})", new))
        deadline = time.monotonic() + timeout
        while old.poll() is None:  # the old one exits once the new one serves
            if new.poll() is not None:
                raise AssertionError(f"the take-over exited with {new.returncode}:\n{self.st.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"edge {old_name} still running {timeout}s after a take-over")
            await asyncio.sleep(0.05)
        slot.proc, slot.name = new, f"e{self._gen}"
        await self._healthy(slot)
        return old_name

    async def replace(self, slot: Slot, **extra: str) -> Slot:
        await self.end(slot)
        return await self.start(slot.role, slot.index, **extra)

    def edges(self) -> list[tuple[str, str]]:
        return [(s.name, s.base) for s in self.slots["edge"] if s.base]

    async def command(self, *args: str, within_s: float = 120) -> tuple[int, str, str]:
        """``refstream *args`` as an operator runs it, straight to the servers."""
        env = env_for(
            self.st.settings,
            REFSTREAM_ARCHIVE_URL=f"file://{self.st.tmp / 'archive'}",
            **({"REFSTREAM_ACK_DURABILITY": "replicas:1"} if self.sentinel is not None else {}),
        )
        return await run_command(*args, env=env, within_s=within_s)

    # -- the run ---------------------------------------------------------------------

    async def up(self) -> World:
        """Servers, proxies, the stage, its workspace and links, and every process."""
        redis_url = await self._redis()
        for link in ("edge-pg", "worker-pg"):
            self.proxies[link] = Proxy(self.pg.port)
        for proxy in self.proxies.values():
            await proxy.start()
        self.stage = st = Stage(self.name, self.pg, redis_url, self.plan)
        await st.cli("migrate")
        await self._shard(st, redis_url)
        for stream in st.keys.streams:  # from the first entry on: the trim keeps what is not archived
            await st.redis.xgroup_create(stream, ARCHIVE, id="0", mkstream=True)
        codes = codes_covering(st.keys, per_partition=2)
        for role in ("worker", "archiver"):
            for i in range(PER_ROLE):
                await self.start(role, i)
        ws = await st.cli("workspace", "create", "Generative", "--shard", self.placed["a"])
        first, *_ = await asyncio.gather(
            st.cli(
                "link",
                "create",
                "--workspace",
                ws["workspace_id"],
                "--code",
                codes[0],
                "--url",
                f"https://shop.test/{codes[0]}",
            ),
            *(self.start("edge", i) for i in range(PER_ROLE)),
        )
        st.base = self.slots["edge"][0].base
        sw = StageWorld(ws["workspace_id"], ws["api_key"], first["program_id"], first["affiliate_id"], codes)
        dub = {"affiliate_id": sw.affiliate_id, "code": DUB_LINK, "url": f"https://shop.test/{DUB_LINK}"}
        await asyncio.gather(
            self._links(sw, codes[1:], dub | {"domain": DUB_DOMAIN}),
            st.api("PATCH", f"/v1/programs/{sw.program_id}/commission", COMMISSION, sw),
        )
        await st.groups_ready()
        async with aiohttp.ClientSession() as http, http.get(f"{st.base}/api/v1/referrals/validate/{codes[0]}") as r:
            referrer_id = (await r.json()).get("referrer_id")
        eraser = await st.cli("keys", "create", "--workspace", ws["workspace_id"], "--scopes", "erase")
        expired = await st.cli(
            "keys", "create", "--workspace", ws["workspace_id"], "--scopes", "track", "--expires-in", "1s"
        )
        other = await self._tenant("b", codes_covering(st.keys, per_partition=1, prefix="b"))
        self.workspaces = {"a": ws["workspace_id"], "b": other.workspace_id}
        rc_program, id_affiliate = await self._cases(sw)
        return World(
            codes,
            ws["api_key"],
            first["program_id"],
            first["affiliate_id"],
            referrer_id,
            eraser["api_key"],
            ws["workspace_id"],
            others={"b": other},
            expired_key=expired["api_key"],
            dub_link=DUB_LINK,
            rc_program=rc_program,
            rc_code=cases.RC_LINK,
            id_affiliate=id_affiliate,
            id_code=cases.ID_LINK,
        )

    async def _links(self, sw: StageWorld, codes: list[str], *more: dict[str, Any]) -> None:
        """The workspace's links, one at a time: on a sharded deployment the edge's link
        create holds a connection of its workspace's pool while it claims the code with one
        of the directory's, the same pool (of 4) for a workspace on ``default``, and eight
        at once waited each other out and were answered 503 after 20 s (seed 2000)."""
        for c in codes:
            body = {"affiliate_id": sw.affiliate_id, "code": c, "url": f"https://shop.test/{c}"}
            await self.st.api("POST", "/v1/links", body, sw)
        for body in more:
            await self.st.api("POST", "/v1/links", body, sw)

    @property
    def shard_url(self) -> str:
        """Shard ``b``'s database: the stage's name, on the shard's own Postgres."""
        return self.shard_pg.url_for(self.st.database)

    async def _shard(self, st: Stage, redis_url: str) -> None:
        """Shard ``b`` added (``refstream shards add``: its database made and migrated), and
        the stage's checker made the one that reads every shard (``shards.py``)."""
        await st.cli("shards", "add", "b", self.shard_url)
        await st.check.close()
        st.check = ShardedChecker(
            {"default": st.settings.database_url, "b": self.shard_url},
            redis_url,
            st.keys,
            Path(st.settings.spool_dir),
        )

    async def _cases(self, sw: StageWorld) -> tuple[str, str]:
        """What issue 64's cases need (``cases.py``): a program of its own whose rules change
        during the run, with an affiliate and a link; and an affiliate named as a customer
        will be, with a link in the world's program. Their ids."""
        st = self.st
        program = await st.api("POST", "/v1/programs", {"name": "rules that change"}, sw)
        body = {"program_id": program["id"], "external_id": "rc-affiliate"}
        affiliate = await st.api("POST", "/v1/affiliates", body, sw)
        url = f"https://shop.test/{cases.RC_LINK}"
        await st.api("POST", "/v1/links", {"affiliate_id": affiliate["id"], "code": cases.RC_LINK, "url": url}, sw)
        rules = {**cases.RULES[0], "duration": "lifetime", "hold_days": 0}
        await st.api("PATCH", f"/v1/programs/{program['id']}/commission", rules, sw)
        named = {"program_id": sw.program_id, "external_id": cases.ID_EXTERNAL, "name": cases.ID_NAME}
        person = await st.api("POST", "/v1/affiliates", {**named, "email": "sam.lee@affiliate.test"}, sw)
        url = f"https://shop.test/{cases.ID_LINK}"
        await st.api("POST", "/v1/links", {"affiliate_id": person["id"], "code": cases.ID_LINK, "url": url}, sw)
        return str(program["id"]), str(person["id"])

    async def _tenant(self, tag: str, codes: list[str]) -> World:
        """Another workspace (``tenants.py``): its links, the same commission rules, its keys."""
        st = self.st
        ws = await st.cli("workspace", "create", f"gen-{tag}", "--shard", self.placed[tag])
        # the pages Dub's clicks may come from (before any of its links is read, so cached)
        await st.check.fetch(
            "UPDATE workspaces SET allowed_origins = $2 WHERE id = $1", uuid.UUID(ws["workspace_id"]), list(B_ORIGINS)
        )
        first = await st.cli(
            "link",
            "create",
            "--workspace",
            ws["workspace_id"],
            "--code",
            codes[0],
            "--url",
            f"https://shop.test/{codes[0]}",
        )
        sw = StageWorld(ws["workspace_id"], ws["api_key"], first["program_id"], first["affiliate_id"], codes)
        await asyncio.gather(
            self._links(sw, codes[1:]),
            st.api("PATCH", f"/v1/programs/{sw.program_id}/commission", COMMISSION, sw),
        )
        eraser = await st.cli("keys", "create", "--workspace", ws["workspace_id"], "--scopes", "erase")
        return World(
            codes,
            ws["api_key"],
            first["program_id"],
            first["affiliate_id"],
            None,
            eraser["api_key"],
            ws["workspace_id"],
            tag,
        )

    async def heal(self) -> list[str]:
        """Everything back: servers running and answering, links forwarding, every slot's
        process running without a clock offset. Returns the processes that had exited by
        themselves (an anomaly: nothing exits on an outage)."""
        for server in self.servers:
            if server.proc is not None and server.proc.poll() is None:
                server.proc.send_signal(signal.SIGCONT)
        for server in self.servers:
            if server.proc is None or server.proc.poll() is not None:
                await self.restart_redis(server)
        for server in self.servers:
            async with self.admin(server) as r:
                await r.config_set("maxmemory", 0)
        if self.sentinel is not None:
            await self.settle()
        if not self.pg.running:
            self.pg.start()
            await self.pg.ready()
        await self.pg.set_read_only(False)
        if not self.shard_pg.running:
            self.shard_pg.start()
            await self.shard_pg.ready()
        for proxy in self.proxies.values():
            proxy.heal()
            proxy.delay_s = 0.0
        exited = self.exited()
        for slots in self.slots.values():
            for slot in slots:
                if slot.stopped:
                    self.send(slot, signal.SIGCONT)
                if slot.proc is None or slot.proc.poll() is not None or slot.extra:
                    await self.replace(slot)
        return exited

    def exited(self) -> list[str]:
        return [
            f"{what} (pid {p.pid}) exited with {p.returncode}"
            for what, p in self.started
            if p.poll() is not None and p.pid not in self.killed
        ]

    async def close(self) -> None:
        for slots in self.slots.values():
            for slot in slots:
                if slot.stopped and slot.proc is not None and slot.proc.poll() is None:
                    self.send(slot, signal.SIGCONT)
        try:
            if self.stage is not None:
                await self.stage.close()
                await self._drop_shard()
        finally:
            for proxy in self.proxies.values():
                await proxy.close()
            if self.sentinel is not None:
                self.sentinel.destroy()
            for server in self.servers:
                if server.proc is not None and server.proc.poll() is None:
                    server.proc.send_signal(signal.SIGCONT)
                server.destroy()

    async def _drop_shard(self) -> None:
        """Shard ``b``'s database dropped, its server left running for the next seed."""
        if not self.shard_pg.running:
            self.shard_pg.start()
            await self.shard_pg.ready()
        conn = await asyncpg.connect(self.shard_pg.url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{self.st.database}" WITH (FORCE)')
        finally:
            await conn.close()

    def info(self) -> dict[str, Any]:
        return {"topology": self.topology, "processes": {r: [s.name for s in v] for r, v in self.slots.items()}}
