"""What a running edge holds: made in the app's cleanup context, kept on ``app[EDGE]``."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from ipaddress import ip_address

import asyncpg
from aiohttp import web

from ingest.contract.connections import Redis
from ingest.contract.drops import DropTally
from ingest.contract.keys import Keys
from ingest.contract.links import LinkInfo
from ingest.contract.settings import Settings
from ingest.edge.auth import Authenticator
from ingest.edge.batcher import RedisBatcher
from ingest.edge.erasure_index import ErasureIndex
from ingest.edge.idempotency import Idempotency
from ingest.edge.metrics import EdgeMetrics
from ingest.edge.ratelimit import RateLimiter
from ingest.ledger.placement import Placement
from ingest.privacy.suppressed import Suppressed
from ingest.spool.spool import Spool

CLIENT_IP_CACHE = 10_000  # (peer, X-Forwarded-For) pairs; cleared when full
CLIENT_IP_CACHE_CHAIN = 256  # longer X-Forwarded-For values are parsed every time


@dataclass(slots=True)
class Edge:
    settings: Settings
    keys: Keys
    redis: Redis
    batcher: RedisBatcher
    pg: asyncpg.Pool  # the directory's, shard "default"
    auth: Authenticator
    spool: Spool
    metrics: EdgeMetrics
    link_sha: str  # links.SET_IF_NEWER, registered with the batcher
    click_limiter: RateLimiter  # seed 000: per client IP
    public_limiter: RateLimiter  # other public routes: per client IP
    key_limiter: RateLimiter  # authenticated routes: per API key
    track_click_limiter: RateLimiter  # Dub's POST /track/click: per client IP
    drops: DropTally  # refusals by reason, for the tenants' stats (ingest.contract.drops)
    idem: Idempotency  # clients' idempotency keys
    # lookup.CHECKED_APPEND, registered with the batcher; None where a request cannot read
    # and append in one script (a Redis Cluster, a durability level that waits)
    checked_append: str | None = None
    # at most this many requests ask Postgres at once (unknown keys, cold link cache, old clicks)
    pg_fallbacks: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))
    # what each key a request read (link, kill switch) held when this edge last read it:
    # what a lookup.Guess is made from, and checked against in Redis (lookup.SEEN_MAX)
    seen: dict[str, bytes | None] = field(default_factory=dict)
    link_memo: dict[bytes, LinkInfo] = field(default_factory=dict)  # a link cache entry, parsed
    suppress: Suppressed = field(default_factory=Suppressed)  # the do-not-track lists
    _client_ips: dict[tuple[str, str], str] = field(default_factory=dict)
    # what an erasure must reach, filed as it is written (the fingerprint cache's entries)
    erasure_index: ErasureIndex | None = None
    # where each workspace's rows are (ingest.ledger.placement): what a fallback asks
    placement: Placement | None = None

    def __post_init__(self) -> None:
        if self.erasure_index is None:
            self.erasure_index = ErasureIndex(self.keys, self.pg)
        if self.placement is None:
            self.placement = Placement.over(self.settings, self.pg, max_size=4)
        self.auth.placement = self.placement

    async def pool(self, workspace_id: str) -> asyncpg.Pool:
        """The pool of the shard ``workspace_id`` is on (``ingest.ledger.placement``)."""
        return await self.shards.pool(workspace_id)

    @property
    def shards(self) -> Placement:
        assert self.placement is not None  # set at construction
        return self.placement

    def client_ip(self, request: web.Request) -> str | None:
        """The peer address; through X-Forwarded-For only when the peer is a trusted proxy.

        The chain is read right to left and the first address that is not a trusted proxy
        is the client: everything left of it could have been written by the client.
        """
        peer = request.transport.get_extra_info("peername") if request.transport else None
        addr: str | None = str(peer[0]) if peer else None
        if addr is None or not self.settings.trusted_proxies:
            return addr
        # every X-Forwarded-For line: a proxy may add its own line rather than append
        chain = ",".join(request.headers.getall("X-Forwarded-For", []))
        # a proxy sends the same few chains over and over: parse each once
        if len(chain) > CLIENT_IP_CACHE_CHAIN:  # the client writes part of it: never cache a long one
            return self._walk(addr, chain)
        known = self._client_ips.get((addr, chain))
        if known is not None:
            return known
        if len(self._client_ips) >= CLIENT_IP_CACHE:
            self._client_ips.clear()
        client = self._client_ips[(addr, chain)] = self._walk(addr, chain)
        return client

    def _walk(self, addr: str, chain: str) -> str:
        hops = [_strip_port(h.strip()) for h in chain.split(",") if h.strip()]
        for hop in [addr, *reversed(hops)]:
            try:
                ip = ip_address(hop)
            except ValueError:
                return addr
            if not any(ip in net for net in self.settings.trusted_proxies):
                return str(ip)
        return addr


def _strip_port(hop: str) -> str:
    """``1.2.3.4:5678`` → ``1.2.3.4``; ``[2001:db8::1]:443`` → ``2001:db8::1``."""
    if hop.startswith("["):
        return hop[1:].split("]", 1)[0]
    if hop.count(":") == 1:
        return hop.split(":", 1)[0]
    return hop


EDGE = web.AppKey("edge", Edge)
