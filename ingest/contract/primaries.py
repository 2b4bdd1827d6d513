"""On a Redis Cluster, a read followed by a WAIT on one connection to the primary that serves
the read's key: what ``REFSTREAM_ACK_DURABILITY=replicas:N`` asks of the workers, the
archivers and ``refstream replay`` (their reads are used only once N replicas hold them).
redis-py's cluster pipeline cannot do it: it sends a keyless WAIT to any node. The edge
does the same for its appends with its own links (``ingest.link.cluster.ClusterLink``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import AskError, MovedError, ReadOnlyError

REDIRECTIONS = 3  # a round trip follows at most this many MOVED, ASK or READONLY (as the edge's)


class Primaries:
    """A plain client per primary of ``cluster`` (a ``Cluster``), made on first use with the
    cluster client's connection settings (its parser too: MOVED and ASK replies are
    ``MovedError`` and ``AskError``)."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self._clients: dict[tuple[str, int], aioredis.Redis] = {}

    async def send(self, key: str, build: Callable[[Any], None]) -> list[Any]:
        """``build(pipeline)`` queues the commands, on one connection to the primary that
        serves ``key``'s slot: their replies (errors as values). A MOVED or READONLY (a
        failover, a slot moved) reads the slots again and sends them where the key is now;
        an ASK (the slot migrating) sends them to the importing node after ASKING; past
        ``REDIRECTIONS``, the redirection is among the replies."""
        await self.cluster.initialize()  # a no-op once initialised
        node = self.cluster.get_node_from_key(key)
        addr, asking = (node.host, int(node.port)), False
        replies: list[Any] = []
        for _ in range(REDIRECTIONS + 1):
            pipe: Any = self._client(addr).pipeline(transaction=False)
            if asking:
                pipe.execute_command("ASKING")
            build(pipe)
            replies = list(await pipe.execute(raise_on_error=False))
            if asking:
                replies = replies[1:]
            redirect = next((r for r in replies if isinstance(r, AskError | ReadOnlyError)), None)
            if isinstance(redirect, AskError):  # a MovedError is one
                addr, asking = (redirect.host, int(redirect.port)), not isinstance(redirect, MovedError)
                if not asking:
                    await self.cluster.refresh()
            elif isinstance(redirect, ReadOnlyError):  # a replica now: its primary is elsewhere
                await self.cluster.refresh()
                node = self.cluster.get_node_from_key(key)
                addr, asking = (node.host, int(node.port)), False
            else:
                break
        return replies

    def _client(self, addr: tuple[str, int]) -> aioredis.Redis:
        client = self._clients.get(addr)
        if client is None:
            skip = ("host", "port", "response_callbacks")  # the node's own, and the cluster client's
            kw = {k: v for k, v in self.cluster.nodes_manager.connection_kwargs.items() if k not in skip}
            pool = aioredis.ConnectionPool(host=addr[0], port=addr[1], **kw)
            client = self._clients[addr] = aioredis.Redis(connection_pool=pool)
        return client

    async def aclose(self) -> None:
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                await client.aclose()
        self._clients.clear()
