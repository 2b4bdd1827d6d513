"""A Redis Cluster through the edge's own RESP links (``ingest.link.resp.DirectLink``), one
per primary: each command goes to the primary of its key's hash slot, a trailing WAIT or
WAITAOF ends every primary's share, and MOVED, ASK and READONLY are followed."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio.connection import Connection
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError, ReadOnlyError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ingest.contract.connections import Cluster, Redis
from ingest.link.resp import Command, DirectLink

WAITS = (b"WAIT", b"WAITAOF")
_ANY_NODE = -1  # a keyless command: any primary answers it
REDIRECTIONS = 3  # a command follows at most this many MOVED, ASK or READONLY in a round trip


class ClusterLink:
    """A Redis Cluster through one ``DirectLink`` per primary: each command goes to the
    primary that serves its key's hash slot, each primary's share in one round trip, the
    primaries' round trips at once.

    A trailing ``WAIT`` or ``WAITAOF`` (the batcher's durability command) ends every
    primary's share, on the same connection as its writes, and its reply is the least the
    primaries confirmed, so ``replicas:N`` means N replicas of every primary written
    (docs/guarantees.md). redis-py's cluster pipeline cannot do this: its WAIT goes to any
    node, after commands sent to others.

    A command answered MOVED, ASK or READONLY did not run: the map of slots is refreshed
    (after MOVED and READONLY) and the command is sent again where it now belongs (ASK: to
    the importing node, after ``ASKING``), with the durability command again, up to three
    times (a MOVED can lead to an ASK); past that the redirection stays in its slot as the
    command's error. A primary that cannot be reached
    fails the round trip (``ConnectionError``, as a lost connection does for a single
    Redis: the outcome of what the other primaries ran is the caller's unknown) and the map
    is refreshed before the next."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        kw = cluster.nodes_manager.connection_kwargs
        self._common: dict[str, Any] = dict(
            username=kw.get("username"),
            password=kw.get("password"),
            timeout_s=kw.get("socket_timeout"),
            connect_timeout_s=kw.get("socket_connect_timeout"),
        )
        self._links: dict[tuple[str, int], DirectLink] = {}
        self._stale = False

    @classmethod
    def for_client(cls, redis: Redis) -> ClusterLink | None:
        if not isinstance(redis, Cluster):
            return None
        kw = redis.nodes_manager.connection_kwargs
        if kw.get("credential_provider") is not None or kw.get("connection_class", Connection) is not Connection:
            return None  # TLS and other connection classes: redis-py's pipeline
        return cls(redis)

    def _link(self, addr: tuple[str, int]) -> DirectLink:
        link = self._links.get(addr)
        if link is None:
            link = self._links[addr] = DirectLink(host=addr[0], port=addr[1], cluster=True, **self._common)
        return link

    async def _map(self) -> None:
        try:
            if self._stale:
                self._stale = False
                await self._cluster.refresh()
            else:
                await self._cluster.initialize()  # a no-op once initialised
        except Exception as exc:
            self._stale = True
            if isinstance(exc, RedisConnectionError | RedisTimeoutError):
                raise
            raise RedisConnectionError(f"cannot read the cluster's slots: {exc!r}") from exc

    def _primary(self, slot: int) -> tuple[str, int]:
        if slot == _ANY_NODE:
            node = self._cluster.get_default_node()
        else:
            node = self._cluster.nodes_manager.get_node_from_slot(slot)
        return node.host, int(node.port)

    async def send(self, commands: Sequence[Command]) -> list[Any]:
        if not commands:
            return []
        wait: Command | None = None
        if _name(commands[-1]) in WAITS:
            wait, commands = commands[-1], commands[:-1]
        await self._map()
        replies: list[Any] = [None] * len(commands)
        confirmed: list[Any] = []
        todo = [(i, self._primary(_slot(cmd)), False) for i, cmd in enumerate(commands)]
        for attempt in range(REDIRECTIONS + 1):
            confirmed += await self._round(commands, todo, wait, replies)
            # where each redirected command goes now (None: where the refreshed map says)
            redirected: list[tuple[int, tuple[str, int] | None, bool]] = []
            for i, _, _ in todo:
                reply = replies[i]
                if isinstance(reply, MovedError):  # before AskError: redis-py's MovedError is one
                    self._stale = True
                    redirected.append((i, (reply.host, int(reply.port)), False))
                elif isinstance(reply, AskError):
                    redirected.append((i, (reply.host, int(reply.port)), True))
                elif isinstance(reply, ReadOnlyError):  # a replica now: its primary is elsewhere
                    self._stale = True
                    redirected.append((i, None, False))
            if not redirected or attempt == REDIRECTIONS:
                break
            if self._stale:
                await self._map()
            todo = [(i, addr or self._primary(_slot(commands[i])), asking) for i, addr, asking in redirected]
        if wait is not None:
            replies.append(_least(confirmed))
        return replies

    async def _round(
        self,
        commands: Sequence[Command],
        todo: list[tuple[int, tuple[str, int], bool]],
        wait: Command | None,
        replies: list[Any],
    ) -> list[Any]:
        """Send each primary its share of ``todo`` (index, primary, ASKING first), with
        ``wait`` last; the replies go to their places in ``replies``; returns the waits'."""
        shares: dict[tuple[str, int], list[tuple[int, bool]]] = {}
        for i, addr, asking in todo:
            shares.setdefault(addr, []).append((i, asking))
        addrs = list(shares)
        sent = [
            [c for i, asking in shares[a] for c in ((("ASKING",), commands[i]) if asking else (commands[i],))]
            + ([wait] if wait is not None else [])
            for a in addrs
        ]
        outcomes = await asyncio.gather(
            *(self._link(a).send(cmds) for a, cmds in zip(addrs, sent, strict=True)), return_exceptions=True
        )
        waits: list[Any] = []
        failure: BaseException | None = None
        for addr, out in zip(addrs, outcomes, strict=True):
            if isinstance(out, BaseException):
                failure = failure or out
                self._stale = True  # a primary gone, or a new one: read the map again
                continue
            if wait is not None:
                waits.append(out.pop())
            k = 0
            for i, asking in shares[addr]:
                k += asking  # the ASKING's own OK
                replies[i] = out[k]
                k += 1
        if failure is not None:
            if isinstance(failure, asyncio.CancelledError):
                raise failure
            if isinstance(failure, OSError) and not isinstance(failure, RedisConnectionError):
                raise RedisConnectionError(f"lost a cluster node: {failure}") from failure
            raise failure
        return waits

    async def load_scripts(self, sources: Sequence[str]) -> None:
        await self._map()
        primaries = {(n.host, int(n.port)) for n in self._cluster.get_primaries()}
        for addr in primaries:
            for reply in await self._link(addr).send([("SCRIPT", "LOAD", source) for source in sources]):
                if isinstance(reply, Exception):
                    raise reply

    def short_of_level(self) -> None:
        return None  # the cluster's map says where each slot's primary is (MOVED follows it)

    async def close(self) -> None:
        for link in self._links.values():
            await link.close()
        self._links.clear()


def _name(cmd: Command) -> bytes:
    name = cmd[0]
    return (name.encode() if isinstance(name, str) else bytes(name)).upper()


def _slot(cmd: Command) -> int:
    """The hash slot of ``cmd``'s key (its first; a script's keys share a tag)."""
    name = _name(cmd)
    if name in (b"EVAL", b"EVALSHA"):
        if int(cmd[2]) == 0:
            return _ANY_NODE
        key = cmd[3]
    elif name in (b"PING", b"SCRIPT", b"ASKING") or len(cmd) < 2:
        return _ANY_NODE
    else:
        key = cmd[1]
    return int(key_slot(key.encode() if isinstance(key, str) else bytes(key)))


def _least(replies: list[Any]) -> Any:
    """What every primary confirmed: an error if one failed, else the smallest count (WAIT)
    or the smallest of each count (WAITAOF's [local, replicas])."""
    for reply in replies:
        if isinstance(reply, Exception):
            return reply
    if not replies:
        return None
    if all(isinstance(r, list) for r in replies):
        return [min(r[k] for r in replies) for k in range(min(len(r) for r in replies))]
    return min(replies)
