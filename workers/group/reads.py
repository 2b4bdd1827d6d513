"""A member's reads (``workers.group.member``): XREADGROUP, and at
``REFSTREAM_ACK_DURABILITY=replicas:N`` the WAIT that follows it (``Reads.xreadgroup``)."""

from __future__ import annotations

from typing import Any

from redis.asyncio.cluster import RedisCluster

from ingest.contract.connections import Redis
from ingest.contract.errors import Unreplicated
from ingest.contract.primaries import Primaries


class Reads:
    """XREADGROUP as ``name`` of ``group``; ``replicas`` (0: none) the replicas to WAIT
    for, at most ``ack_wait_ms``."""

    def __init__(self, redis: Redis, group: str, name: str, replicas: int, ack_wait_ms: int) -> None:
        self.redis, self.group, self.name = redis, group, name
        self.replicas, self.ack_wait_ms = replicas, ack_wait_ms
        # on a Redis Cluster at replicas:N: the read and its WAIT on one connection to the
        # primary of the stream's slot (``_read_waited``)
        self._primaries: Primaries | None = None

    async def xreadgroup(self, streams: dict[Any, Any], count: int, block: int | None = None) -> Any:
        """XREADGROUP; at ``REFSTREAM_ACK_DURABILITY=replicas:N``, followed on the same
        connection by a WAIT for N replicas, so that what this member acts on (stores,
        archives) is where a failover cannot lose it. The read is itself a write (it moves
        the group's pending list), replicated after the entries it delivers: once N replicas
        have it, they have those entries. Short of N, ``Unreplicated`` (an outage): the
        entries stay pending here and are read again, and waited for, from the backlog; a
        failover meanwhile loses them with the primary, and Postgres never saw them."""
        if not self.replicas:
            return await self.redis.xreadgroup(self.group, self.name, streams, count=count, block=block)
        if isinstance(self.redis, RedisCluster):
            reply, acked = await self._read_waited(streams, count, block)
        else:
            pipe: Any = self.redis.pipeline(transaction=False)
            pipe.xreadgroup(self.group, self.name, streams, count=count, block=block)
            pipe.execute_command("WAIT", self.replicas, self.ack_wait_ms)
            reply, acked = await pipe.execute(raise_on_error=False)
        if isinstance(reply, Exception):
            raise reply
        if isinstance(acked, Exception):
            raise acked
        if reply and int(acked) < self.replicas:
            raise Unreplicated(f"{acked} of {self.replicas} replicas have the entries read")
        return reply

    async def _read_waited(self, streams: dict[Any, Any], count: int, block: int | None) -> tuple[Any, Any]:
        """On a Redis Cluster: (the XREADGROUP's reply, the WAIT's), on one connection to
        the primary that serves the stream's slot (``Primaries``)."""
        if self._primaries is None:
            self._primaries = Primaries(self.redis)
        (stream,) = streams

        def read(pipe: Any) -> None:
            pipe.xreadgroup(self.group, self.name, streams, count=count, block=block)
            pipe.execute_command("WAIT", self.replicas, self.ack_wait_ms)

        reply, acked = await self._primaries.send(stream, read)
        return reply, acked

    async def aclose(self) -> None:
        if self._primaries is not None:
            await self._primaries.aclose()
