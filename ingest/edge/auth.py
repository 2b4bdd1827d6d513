"""API-key authentication at the edge.

A key is looked up by its sha256 (the key itself is never stored): first in a small
in-process cache (a hot key costs no round trip), then in Redis
(``{prefix}:apikey:{sha256 hex}``, written when a key is created or revoked), and only when
Redis does not know it, in Postgres (which refills Redis). In-process entries live
``key_cache_s`` seconds, so a revocation reaches every edge within that time.

A key made with an expiry carries it in every copy (``Principal.expires_ms``), and each
lookup, a cache hit included, refuses it from that instant on, on every edge alike: an
expiry needs no message, so it lands at once, not within ``key_cache_s``.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, Final

import asyncpg
import orjson

from ingest.contract import clock
from ingest.contract.connections import Command, Redis
from ingest.contract.keys import Keys
from ingest.edge.apikeys import hash_key
from ingest.ledger.placement import Placement
from ingest.link.errors import through

_UNKNOWN: Final = b"-"
REDIS_TTL_S: Final = 24 * 3600
NEGATIVE_TTL_S: Final = 60
_MAX_SECRET: Final = 256
EXPLICIT: Final = frozenset({"erase"})  # scopes that "*" does not grant: what cannot be undone


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a valid key speaks for."""

    key_id: str
    workspace_id: str
    kind: str  # "workspace" | "affiliate"
    scopes: tuple[str, ...]
    prefix: str
    affiliate_id: str | None = None
    expires_ms: int | None = None  # None: until revoked

    def allows(self, scope: str) -> bool:
        if self.kind == "affiliate":
            return scope == "read"  # affiliate keys are read-only, whatever they carry
        if scope in EXPLICIT:
            return scope in self.scopes  # granted by name only: never by "*"
        return "*" in self.scopes or scope in self.scopes

    def expired(self, now_ms: int) -> bool:
        return self.expires_ms is not None and now_ms >= self.expires_ms

    def encode(self) -> bytes:
        # no expiry, no field: an edge of the build before expiries reads the entry too
        d = asdict(self)
        if d["expires_ms"] is None:
            del d["expires_ms"]
        return orjson.dumps(d)

    @classmethod
    def decode(cls, raw: bytes) -> Principal | None:
        if raw == _UNKNOWN:
            return None
        d = orjson.loads(raw)
        d["scopes"] = tuple(d["scopes"])
        return cls(**{k: v for k, v in d.items() if k in _FIELDS})  # a newer build's fields: not ours


_FIELDS: Final = frozenset(f.name for f in fields(Principal))


def live(principal: Principal | None) -> Principal | None:
    """The principal, or None once its key has expired: refused like a revoked key."""
    return None if principal is None or principal.expired(clock.now_ms()) else principal


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer":
        return None
    return plausible(token)


def plausible(secret: str | None) -> str | None:
    """A key-shaped string, or None: nothing else is worth a lookup (undecodable bytes,
    control characters, absurd lengths answer 401 without touching Redis or Postgres)."""
    if not secret or len(secret) > _MAX_SECRET or not secret.isascii() or not secret.isprintable() or " " in secret:
        return None
    return secret


_SELECT_KEY = """
SELECT id, workspace_id, kind, scopes, prefix, affiliate_id, expires_at
FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL
"""


class Authenticator:
    def __init__(self, redis: Redis, keys: Keys, pg: asyncpg.Pool, *, ttl_s: float, max_entries: int = 10_000):
        self.redis = redis
        self.keys = keys
        self.pg = pg
        self.placement: Placement | None = None  # set by the edge: a key is on its workspace's shard
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._local: OrderedDict[bytes, tuple[float, Principal | None]] = OrderedDict()
        self._asking: dict[bytes, asyncio.Future[Principal | None]] = {}  # a key's question to Postgres, in flight

    def cached(self, secret: str) -> tuple[bytes, Principal | None, bool]:
        """(digest, principal, hit). On a miss, ``redis_key(digest)`` is what to GET."""
        digest = hash_key(secret)
        entry = self._local.get(digest)
        if entry is not None and entry[0] > time.monotonic():
            self._local.move_to_end(digest)
            return digest, live(entry[1]), True
        return digest, None, False

    def redis_key(self, digest: bytes) -> str:
        return self.keys.apikey(digest.hex())

    async def resolve(self, digest: bytes, reply: object) -> Principal | None:
        """Finish a lookup with the Redis reply to ``GET redis_key(digest)``."""
        if isinstance(reply, bytes):
            principal = Principal.decode(reply)
        else:
            principal = await self._from_postgres(digest)
        self._remember(digest, principal)
        return live(principal)

    async def asked_once(self, digest: bytes, ask: Callable[[], Awaitable[Principal | None]]) -> Principal | None:
        """``ask`` (Postgres, for a key neither this edge nor Redis holds) once at a time per
        key: the requests of a burst on a cold key wait for the first one's answer rather than
        each queueing for a question of its own behind ``fallback``'s few places (where a
        burst of 48 at once was answered 503 for want of a place within its wait). A caller
        cancelled leaves the question to the others."""
        running = self._asking.get(digest)
        if running is None:
            running = asyncio.ensure_future(ask())
            self._asking[digest] = running
            running.add_done_callback(functools.partial(_settled, self._asking, digest))
        return await asyncio.shield(running)

    async def _from_postgres(self, digest: bytes) -> Principal | None:
        if self.placement is not None:  # a digest is unique across shards: the one that holds it
            found = await self.placement.find(
                lambda pool: pool.fetchrow(_SELECT_KEY, digest), lambda r: r["workspace_id"]
            )
            row = found[1] if found is not None else None
        else:
            row = await self.pg.fetchrow(_SELECT_KEY, digest)
        principal = principal_from_row(row) if row else None
        # NX: a revocation's tombstone written since our read must win over our fill; its
        # errors the tree's (``ingest.link.errors.through``): the request's outage
        await through(cache_key(self.redis, self.keys, digest, principal, only_if_absent=True))
        return principal

    def _remember(self, digest: bytes, principal: Principal | None) -> None:
        self._local[digest] = (time.monotonic() + self.ttl_s, principal)
        self._local.move_to_end(digest)
        while len(self._local) > self.max_entries:
            self._local.popitem(last=False)


def _settled(asking: dict[bytes, asyncio.Future[Principal | None]], digest: bytes, done: asyncio.Future[Any]) -> None:
    """A key's question answered: the next request asks anew; its error heard here too, so
    that one whose callers all went is not reported as never retrieved."""
    if asking.get(digest) is done:
        del asking[digest]
    if not done.cancelled():
        done.exception()


def principal_from_row(row: asyncpg.Record) -> Principal:
    return Principal(
        key_id=str(row["id"]),
        workspace_id=str(row["workspace_id"]),
        kind=row["kind"],
        scopes=tuple(row["scopes"]),
        prefix=row["prefix"],
        affiliate_id=str(row["affiliate_id"]) if row["affiliate_id"] else None,
        expires_ms=int(row["expires_at"].timestamp() * 1000) if row["expires_at"] else None,
    )


def unknown(keys: Keys, digest: bytes) -> Command:
    """The SET that marks a key's Redis entry revoked or unknown (``cache_key``'s, with no
    principal)."""
    return ("SET", keys.apikey(digest.hex()), _UNKNOWN, "EX", NEGATIVE_TTL_S)


async def cache_key(
    redis: Redis, keys: Keys, digest: bytes, principal: Principal | None, *, only_if_absent: bool = False
) -> None:
    """Write (or, for a revoked or unknown key, negate) a key's Redis entry."""
    if principal is None:
        await redis.set(keys.apikey(digest.hex()), _UNKNOWN, ex=NEGATIVE_TTL_S, nx=only_if_absent)
    else:
        await redis.set(keys.apikey(digest.hex()), principal.encode(), ex=REDIS_TTL_S, nx=only_if_absent)
