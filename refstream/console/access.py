"""Who may see what: the operator, by ``REFSTREAM_CONSOLE_TOKEN``; a tenant, by a workspace
key of scope ``read``, and only its own workspace.

Both come in ``Authorization: Bearer``, never in a URL or a cookie: a cookie would be sent
by any page that posts to the console (CSRF), a URL lands in logs and histories. A refusal
says nothing of why (no key, a wrong key, a revoked one, a key of another kind or scope):
one 401 with one body, so a guesser learns nothing from the answer.
"""

from __future__ import annotations

import hmac
import ipaddress

import asyncpg
from aiohttp import web

from ingest.contract.connections import Redis
from ingest.contract.errors import Misconfigured
from ingest.contract.keys import Keys
from ingest.edge.auth import Authenticator, Principal, bearer
from ingest.ledger.placement import Placement

REFUSAL = b'{"error":"unauthorized"}'


class OpenConsole(Misconfigured):
    """Asked to listen beyond loopback without an operator token."""


def refused() -> web.Response:
    """The one refusal, whatever was wrong."""
    return web.Response(
        status=401, body=REFUSAL, content_type="application/json", headers={"WWW-Authenticate": "Bearer"}
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def check_bind(host: str, token: str | None) -> None:
    """Refuse to start where others could reach pages no token guards."""
    if token is None and not is_loopback(host):
        raise OpenConsole(
            f"refstream console on {host} needs REFSTREAM_CONSOLE_TOKEN (16 characters or more); set it, or"
            " listen on loopback only (--host 127.0.0.1)"
        )


class Access:
    """The operator's token, and workspace keys through the edge's own lookup
    (``ingest.edge.auth``: Redis, then Postgres). Unlike the edge, the console keeps no key
    in its process (a page's few requests a second are no hot path): a revocation, which
    writes its tombstone in Redis before it commits, is refused at the next request."""

    def __init__(
        self, token: str | None, redis: Redis, keys: Keys, pg: asyncpg.Pool, shards: Placement | None = None
    ) -> None:
        self._token = token.encode() if token else None
        self._keys = Authenticator(redis, keys, pg, ttl_s=0.0)
        self._keys.placement = shards  # a key is on its workspace's shard
        self._redis = redis

    @property
    def token_needed(self) -> bool:
        return self._token is not None

    def operator(self, request: web.Request) -> bool:
        """The request carries the operator's token (compared in constant time). Without a
        token configured the console listens on loopback only (``check_bind``) and every
        caller there is the operator."""
        if self._token is None:
            return True
        given = bearer(request.headers.get("Authorization"))
        return given is not None and hmac.compare_digest(given.encode(), self._token)

    async def tenant(self, request: web.Request) -> Principal | None:
        """The workspace key of scope ``read`` the request carries, or None."""
        secret = bearer(request.headers.get("Authorization"))
        if secret is None:
            return None
        digest, principal, hit = self._keys.cached(secret)
        if not hit:
            principal = await self._keys.resolve(digest, await self._redis.get(self._keys.redis_key(digest)))
        if principal is None or principal.kind != "workspace" or not principal.allows("read"):
            return None
        return principal
