"""The micro-batcher's own connection to Redis: one socket, RESP packed in one pass,
replies parsed by hiredis in C.

Under load redis-py's pipeline took about a quarter of the edge's CPU: it packs
each command through several layers, wraps every reply read in a timeout and runs a
response callback per command. The batcher needs none of that: it sends a flat list of
commands and hands each raw reply (bytes, int, list, None, or the redis-py exception of an
error reply) back to the request that asked. So for a single Redis (TCP or unix socket, no TLS) it talks RESP
itself over an asyncio protocol (a Redis Cluster: one such link per primary,
``ingest.link.cluster``); anything else (TLS, a credential provider) goes through
redis-py's pipeline (``PipelineLink``), whose replies differ only where no caller looks (a
SET answers True rather than b"OK"). Which link a client gets: ``ingest.link.choice``.

One batch is in flight at a time, under one timeout. A timeout or a lost connection fails
that batch with a redis-py ``TimeoutError`` / ``ConnectionError`` (both in
``REDIS_ERRORS``), and the next batch connects again.

Every reply answers its own command (docs/guarantees.md). RESP has no request ids: a reply
belongs to a command only by its place on the connection. So every round trip ends with an
``ECHO`` of a mark of its own (``DirectLink.send``): its reply must come back last and equal,
or the connection is out of step, whatever put it there, and is dropped with the batch
failed rather than a reply handed to the wrong command. And a connection is used again
only after a round trip that got every reply it asked for; a round trip that ends any other
way (its own timeout, a deadline or cancellation from outside, a lost connection, a health
check PING that did not come back) closes the connection there and then, inside
``round_trip`` itself, because the replies still owed would otherwise answer the next
round trip's commands: after a stall (a SIGSTOPped Redis, a full disk, a long fork) the
server answers everything written before it stopped. A reply that no command on the
connection is owed, or that arrives after the close, is never handed to anyone.
A reply that cannot be the answer to its command (a caller's shape check,
``RedisBatcher.execute(check=...)``: ``ingest.link.errors.impossible``) drops the
connection the same way.

What this module raises and hands back is redis-py's; ``ingest.link.choice`` puts every
link behind the room's boundary (``ingest.link.errors``), which turns it into the tree's.

Behind Sentinel (a ``redis+sentinel://`` URL) the link asks the sentinels where the primary
is at every connect (``SENTINEL`` through redis-py's pool, as its own connections do). A
READONLY or MASTERDOWN reply means the connection reached a replica (a failover demoted its
server, or an address now points at a replica): the connection is dropped, so the next
batch connects, and asks again, while the replies in their slots fail their requests. So
does a round trip short of the durability level (``short_of_level``): its server may be a
primary Sentinel has deposed and not yet turned into a replica.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import hiredis
import redis.asyncio as aioredis
from redis._parsers.base import BaseParser
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.asyncio.sentinel import SentinelConnectionPool, SentinelManagedConnection
from redis.cluster import ClusterParser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ingest.contract.connections import Redis, client_fault

Command = tuple[Any, ...]
HEALTH_CHECK_S = 30.0  # idle this long: PING before the next batch


class Link(Protocol):
    async def send(self, commands: Sequence[Command]) -> list[Any]:
        """Every command's raw reply, in order; an error reply in its slot as an exception."""
        ...

    async def load_scripts(self, sources: Sequence[str]) -> None:
        """SCRIPT LOAD each of ``sources`` (on every primary, on a cluster)."""
        ...

    async def close(self) -> None: ...

    def short_of_level(self) -> None:
        """A round trip's writes fell short of the durability level (``RedisBatcher``)."""
        ...


def pack(commands: Sequence[Command]) -> bytes:
    """RESP arrays of bulk strings; arguments are bytes, str, int or float (a bytearray or
    memoryview too). hiredis packs in C what it takes (str, bytes, int, float, memoryview:
    byte for byte what ``_pack`` writes, at about a third of its CPU for an append's ~40
    arguments, which was a fifth of the edge's Python); anything else goes through ``_pack``,
    which packs a bytearray and raises TypeError for what Redis cannot be sent (None, a bool)."""
    try:
        return b"".join([_pack_command(cmd if type(cmd) is tuple else tuple(cmd)) for cmd in commands])
    except TypeError:
        return _pack(commands)


_pack_command = hiredis.pack_command


def _echo(mark: bytes) -> bytes:
    """``ECHO mark`` in RESP: the command that closes every round trip."""
    return b"*2\r\n$4\r\nECHO\r\n$%d\r\n%b\r\n" % (len(mark), mark)


def _pack(commands: Sequence[Command]) -> bytes:
    out: list[bytes] = []
    append = out.append
    for cmd in commands:
        append(b"*%d\r\n" % len(cmd))
        for arg in cmd:
            kind = type(arg)  # exact types first: this loop runs for every argument sent
            if kind is str:
                arg = arg.encode()
            elif kind is int:
                arg = b"%d" % arg
            elif kind is not bytes:
                arg = _encode(arg)
            append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(out)


def _encode(arg: object) -> bytes:
    if isinstance(arg, bytes | bytearray | memoryview):
        return bytes(arg)
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, int) and not isinstance(arg, bool):
        return b"%d" % arg
    if isinstance(arg, float):
        return repr(arg).encode()
    raise TypeError(f"cannot send a {type(arg).__name__} to Redis")


class _Replies(asyncio.Protocol):
    """One connection's replies, one round trip at a time. ``closed`` is final: a round trip
    that ended without all its replies leaves the connection closed (see the module doc)."""

    def __init__(self, parse_error: Callable[[str], Exception] = BaseParser.parse_error) -> None:
        # errors as redis-py makes them (NoScriptError, BusyLoadingError, AuthenticationError,
        # and on a cluster's node MovedError, AskError, TryAgainError ...)
        self.reader = hiredis.Reader(protocolError=InvalidResponse, replyError=parse_error)
        self.transport: asyncio.Transport | None = None
        self.replies: list[Any] = []
        self.want = 0
        self.done: asyncio.Future[list[Any]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return  # read before the close (uvloop delivers it after): nobody is owed it
        self.reader.feed(data)
        replies = self.replies
        gets = self.reader.gets
        done = self.done
        try:
            while (reply := gets()) is not False:
                if done is None or done.done() or len(replies) >= self.want:
                    self._fail(RedisConnectionError("Redis sent a reply that no command on the connection is owed"))
                    return
                replies.append(reply)
        except InvalidResponse as exc:
            self._fail(RedisConnectionError(f"protocol error from Redis: {exc}"))
            return
        if done is not None and len(replies) == self.want and not done.done():
            done.set_result(replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(RedisConnectionError(f"connection to Redis lost: {exc or 'closed by the server'}"))

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def abandon(self, why: str) -> None:
        """Close for good: replies still owed must never answer another round trip."""
        self._fail(RedisConnectionError(why))

    async def round_trip(self, payload: bytes, n: int) -> list[Any]:
        """The ``n`` replies to ``payload``'s ``n`` commands. Any other end (an exception,
        a cancellation: the caller's deadline) closes the connection first."""
        assert self.transport is not None and n > 0
        if self.closed:
            raise RedisConnectionError("connection to Redis is closed")
        if self.done is not None and not self.done.done():
            raise RuntimeError("one round trip at a time on a DirectLink connection")
        self.replies = []
        self.want = n
        done: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.done = done
        try:
            self.transport.write(payload)
            return await done
        except BaseException:
            # a cancelled wait cancels ``done`` too, so "done" says nothing of what is owed:
            # whatever ended this round trip early, the connection is out of step with it
            self.abandon("a round trip ended before all its replies came")
            raise


class DirectLink:
    """RESP over one asyncio connection to a single Redis server, for one caller at a time
    (the batcher's flusher)."""

    def __init__(
        self,
        *,
        host: str = "localhost",
        port: int = 6379,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        timeout_s: float | None = None,
        connect_timeout_s: float | None = None,
        locate: Callable[[], Awaitable[tuple[str, int]]] | None = None,
        cluster: bool = False,
    ) -> None:
        self._addr = (host, port)
        self._protocol = functools.partial(_Replies, ClusterParser.parse_error) if cluster else _Replies
        self._locate = locate  # where the primary is now (Sentinel), asked at every connect
        self._path = path
        self._hello: list[Command] = []
        if password is not None:
            self._hello.append(("AUTH", username, password) if username else ("AUTH", password))
        if db:
            self._hello.append(("SELECT", db))
        self._timeout = timeout_s
        self._connect_timeout = connect_timeout_s or timeout_s
        self._conn: _Replies | None = None
        self._used = 0.0  # monotonic time of the last reply
        self._trips = 0  # round trips sent: each one's closing ECHO carries its number

    @property
    def where(self) -> str:
        where = self._path or f"{self._addr[0]}:{self._addr[1]}"
        return f"{where} (the primary, from Sentinel)" if self._locate else where

    @classmethod
    def for_client(cls, redis: Redis) -> DirectLink | None:
        """A link to the server ``redis`` talks to, or None where only redis-py will do."""
        if not isinstance(redis, aioredis.Redis):
            return None
        pool = redis.connection_pool
        kw = pool.connection_kwargs
        if kw.get("credential_provider") is not None:
            return None
        common = dict(
            db=int(kw.get("db") or 0),
            username=kw.get("username"),
            password=kw.get("password"),
            timeout_s=kw.get("socket_timeout"),
            connect_timeout_s=kw.get("socket_connect_timeout"),
        )
        if isinstance(pool, SentinelConnectionPool) and pool.connection_class is SentinelManagedConnection:
            return cls(locate=pool.get_master_address, **common)  # type: ignore[arg-type]
        if pool.connection_class is Connection:
            return cls(host=kw.get("host", "localhost"), port=int(kw.get("port", 6379)), **common)  # type: ignore[arg-type]
        if pool.connection_class is UnixDomainSocketConnection:
            return cls(path=kw["path"], **common)  # type: ignore[arg-type]
        return None  # TLS and other connection classes

    async def _connect(self) -> _Replies:
        loop = asyncio.get_running_loop()
        transport: asyncio.BaseTransport | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self._locate is not None:
                    host, port = await self._locate()  # MasterNotFoundError: a ConnectionError
                    self._addr = (str(host), int(port))
                if self._path is not None:
                    transport, conn = await loop.create_unix_connection(self._protocol, self._path)
                else:
                    transport, conn = await loop.create_connection(self._protocol, *self._addr)
                    sock = transport.get_extra_info("socket")
                    if sock is not None:
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # uvloop may call connection_made after this returns: don't wait for it
                conn.transport = transport
                if self._hello:
                    for reply in await conn.round_trip(pack(self._hello), len(self._hello)):
                        if isinstance(reply, Exception):
                            raise RedisConnectionError(f"Redis refused the connection: {reply}")
            return conn
        except BaseException as exc:
            if transport is not None:  # a stalled or refused handshake: never leak the socket
                transport.close()
            if isinstance(exc, TimeoutError):
                raise RedisTimeoutError(f"timed out connecting to Redis at {self.where}") from None
            if isinstance(exc, OSError):
                raise RedisConnectionError(f"cannot connect to Redis at {self.where}: {exc}") from exc
            raise

    async def send(self, commands: Sequence[Command]) -> list[Any]:
        if not commands:
            return []
        conn = await self._ready()
        self._trips += 1
        mark = b"rs:%d" % self._trips
        try:
            async with asyncio.timeout(self._timeout):
                replies = await conn.round_trip(pack(commands) + _echo(mark), len(commands) + 1)
        except TimeoutError:
            self._drop()  # round_trip closed it already: the next batch connects again
            raise RedisTimeoutError("Redis did not answer in time") from None
        except BaseException:
            self._drop()  # lost, or cancelled by the caller's deadline: closed the same way
            raise
        last = replies.pop()
        if last != mark:
            self._drop()  # a LOADING or NOAUTH server answers the ECHO with its error too
            if isinstance(last, RedisConnectionError):
                raise last
            raise RedisConnectionError(f"Redis's replies are out of step with their commands (closing ECHO: {last!r})")
        self._used = time.monotonic()
        for reply in replies:
            # LOADING, NOAUTH, max clients...: the server is not serving this connection; as
            # redis-py does, the whole batch fails (callers treat it as Redis being down)
            if isinstance(reply, RedisConnectionError):
                self._drop()
                raise reply
            if isinstance(reply, ResponseError) and _on_replica(reply):
                self._drop()  # the next batch connects again (and asks Sentinel where to)
        return replies

    async def _ready(self) -> _Replies:
        """An open connection; after a long idle spell, checked with a PING first (as redis-py
        does every ``health_check_interval``), so a connection the server or a proxy dropped
        silently is replaced before a batch is written into it."""
        if self._conn is not None and not self._conn.closed:
            if time.monotonic() - self._used < HEALTH_CHECK_S:
                return self._conn
            try:
                async with asyncio.timeout(self._timeout):
                    (pong,) = await self._conn.round_trip(pack([("PING",)]), 1)
                if not isinstance(pong, Exception):
                    self._used = time.monotonic()
                    return self._conn
            except (TimeoutError, RedisConnectionError):
                pass
            except BaseException:
                self._drop()  # cancelled: the PONG would answer the next batch
                raise
        self._drop()
        self._conn = await self._connect()
        self._used = time.monotonic()
        return self._conn

    async def load_scripts(self, sources: Sequence[str]) -> None:
        for reply in await self.send([("SCRIPT", "LOAD", source) for source in sources]):
            if isinstance(reply, Exception):
                raise reply

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.abandon("connection dropped by the edge")
            self._conn = None

    async def close(self) -> None:
        self._drop()

    def short_of_level(self) -> None:
        """Behind Sentinel, a write short of the durability level may have reached a primary
        Sentinel has deposed and not yet turned into a replica (unreachable by Sentinel, say):
        it still takes writes, no replica follows it, and they are gone when it is turned. The
        connection is dropped, so the next round trip asks Sentinel where the primary is (the
        same one again while a replica only lags). A single server is the only one there is."""
        if self._locate is not None:
            self._drop()


def _on_replica(reply: object) -> bool:
    """A reply that only a replica gives: the connection is not to the primary."""
    return isinstance(reply, ReadOnlyError) or (
        isinstance(reply, ResponseError) and str(reply).startswith("MASTERDOWN")
    )


class PipelineLink:
    """redis-py's non-transactional pipeline (Redis Cluster splits it by node). Replies
    pass redis-py's response callbacks (a SET answers True rather than b"OK"): callers of
    the batcher only read GET, EVALSHA and XADD replies, which are the same either way."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def send(self, commands: Sequence[Command]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for cmd in commands:
            pipe.execute_command(*cmd)
        try:
            results: list[Any] = await pipe.execute(raise_on_error=False)
        except (RuntimeError, AttributeError) as exc:
            if not client_fault(exc):
                raise
            raise RedisConnectionError(f"the cluster client lost its connections: {exc!r}") from exc
        return results

    async def load_scripts(self, sources: Sequence[str]) -> None:
        for source in sources:
            await self._redis.script_load(source)

    async def close(self) -> None:
        return None

    def short_of_level(self) -> None:
        return None  # redis-py's pool asks Sentinel at each connect, and a cluster has no WAIT of ours
