"""Whether what a sweep did in Redis is where a failover cannot undo it
(``REFSTREAM_ACK_DURABILITY=replicas:N``), before its erasures are marked done there.

A fence key written then a WAIT, on one connection: replication is in order, so a replica
that has the fence has every write made before it on that primary, by any connection.
(Without it, a Sentinel failover right after a sweep promoted a replica that lacked its
XDELs and answer rewrites, and the erasure, marked done, left the person in Redis: the
generative test's seed 1029314941.) On a Redis Cluster, one fence per partition's slot (the
entries and answers a sweep touches carry its tag), one for the dead letters, and one on
each primary for the keys of other slots it deletes (a click's cache entry, an address's
rate limits, a visitor's fingerprints).

A fence proves nothing of a primary that is gone: a failover *during* the sweep sent its
first writes (the ledger's copy, deletes, rewrites) to the old primary and the fence to the
new one, which holds none of them and still answered the WAIT. So the sweep notes each
fence's server (its ``run_id``) before its first write, and the fence asks again on its own
connection: another server means the sweep is not done, and the next one does it again.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio.cluster import RedisCluster

from ingest.contract.connections import Redis
from ingest.contract.keys import Keys
from ingest.contract.primaries import Primaries


class Fence:
    """The fences of a sweep over ``high`` partitions; ``replicas`` 0: none asked."""

    def __init__(self, redis: Redis, keys: Keys, high: int, replicas: int, wait_ms: int) -> None:
        self.redis, self.replicas, self.wait_ms, self.prefix = redis, replicas, wait_ms, keys.prefix
        self.keys_and_fences = [(keys.stream(p), f"{keys.prefix}:erasure:fence:{{{p}}}") for p in range(high)]
        self.keys_and_fences.append((keys.dead, f"{{{keys.dead}}}:erasure:fence"))
        if not isinstance(redis, RedisCluster):
            self.keys_and_fences = self.keys_and_fences[:1]
        self.servers: list[str] = []  # each fence's server, before the sweep's first write

    async def begin(self) -> None:
        """Note each fence's server: before the sweep writes anything in Redis."""
        if self.replicas:
            if isinstance(self.redis, RedisCluster):
                self.keys_and_fences += await self._per_primary()
            self.servers = [_run_id(r[0]) for r in await self._each(lambda pipe, fence: None)]

    async def _per_primary(self) -> list[tuple[str, str]]:
        """A fence on each primary of the cluster, of a key its slots hold: the sweep writes
        keys of any slot besides its streams' and letters' (a click's cache entry, an
        address's rate limits, a visitor's fingerprints), and a primary's fence covers every
        write made on it before."""
        await self.redis.initialize()
        wanted = {n.name for n in self.redis.get_primaries()}  # type: ignore[union-attr]
        out = []
        for i in range(1_000_000):
            if not wanted:
                break
            key = f"{self.prefix}:erasure:fence:node:{i}"
            if (name := self.redis.get_node_from_key(key).name) in wanted:  # type: ignore[union-attr]
                wanted.discard(name)
                out.append((key, key))
        return out

    async def held(self) -> str | None:
        """None once ``replicas`` replicas hold every write this sweep made, on the servers
        it began on; else why not."""
        if not self.replicas:
            return None

        def fenced(pipe: Any, fence: str) -> None:
            pipe.set(fence, b"1", px=60_000)
            pipe.execute_command("WAIT", self.replicas, self.wait_ms)

        for (key, _), before, replies in zip(self.keys_and_fences, self.servers, await self._each(fenced), strict=True):
            if error := next((r for r in replies if isinstance(r, Exception)), None):
                return f"{type(error).__name__}: {error}"
            if _run_id(replies[0]) != before:
                return f"another server holds {key} since the sweep began (a failover)"
            if int(replies[-1]) < self.replicas:
                return f"{replies[-1]} of {self.replicas} replicas within {self.wait_ms} ms ({key})"
        return None

    async def _each(self, build: Any) -> list[list[Any]]:
        """For each fence: ``INFO server`` and what ``build(pipe, fence)`` queues, on one
        connection to the primary that serves its key."""
        primaries = Primaries(self.redis) if isinstance(self.redis, RedisCluster) else None
        out = []
        try:
            for key, fence in self.keys_and_fences:

                def queued(pipe: Any, fence: str = fence) -> None:
                    pipe.execute_command("INFO", "server")
                    build(pipe, fence)

                if primaries is not None:
                    out.append(await primaries.send(key, queued))
                else:
                    pipe: Any = self.redis.pipeline(transaction=False)
                    queued(pipe)
                    out.append(list(await pipe.execute(raise_on_error=False)))
        finally:
            if primaries is not None:
                await primaries.aclose()
        return out


def _run_id(info: Any) -> str:
    """A server's ``run_id`` from its ``INFO server`` (an error: none)."""
    return str(info.get("run_id")) if isinstance(info, dict) else ""
