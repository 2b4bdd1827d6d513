"""Workspaces and links, as the CLI (and later the management API) create and read them.

Postgres is the truth; after each commit the link cache in Redis is written so the edge
sees the change without asking Postgres.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

import asyncpg
import orjson
from redis.exceptions import ConnectionError as RedisConnectionError

from ingest.contract import links
from ingest.contract.connections import Redis, client_fault, write
from ingest.contract.errors import NotFound
from ingest.contract.fraud import FRAUD_POLICIES, FRAUD_RULES
from ingest.contract.keys import Keys
from ingest.contract.replicated import Replicated
from ingest.contract.urls import hostname, with_param, without_param
from ingest.edge import apikeys, auth

DEFAULT_PROGRAM = "Default program"
DEFAULT_AFFILIATE = "default"


async def create_workspace(conn: asyncpg.Connection, name: str, workspace_id: UUID | None = None) -> dict[str, str]:
    """A workspace (with the id ``workspace_id`` its placement chose, else a new one) and
    its first key, scope ``*``; the key is in the result only."""
    key = apikeys.mint("workspace")
    async with write(conn):
        ws = await conn.fetchval(
            "INSERT INTO workspaces (id, name) VALUES (coalesce($2, gen_random_uuid()), $1) RETURNING id",
            name,
            workspace_id,
        )
        await conn.execute(
            "INSERT INTO api_keys (workspace_id, kind, key_hash, prefix, scopes, name)"
            " VALUES ($1, 'workspace', $2, $3, '{*}', 'default')",
            ws,
            key.digest,
            key.prefix,
        )
    return {"workspace_id": str(ws), "api_key": key.secret}


BOT_POLICIES = ("exclude", "count")
_WORKSPACE_COLUMNS = "id, name, ip_policy, bot_policy, fraud_policy::text AS fraud_policy, allowed_origins, created_at"


async def update_workspace(
    conn: asyncpg.Connection, workspace_id: str, *, bot_policy: str | None, fraud_policy: dict[str, str] | None = None
) -> dict[str, Any]:
    """Change a workspace's settings (those given); the workspace as it is now.

    ``bot_policy``: ``exclude`` counts bots' clicks apart, in ``bot_clicks`` only; ``count``
    counts them as clicks too (bio.re's behaviour). The workers read it for every batch,
    so it applies to the clicks they store from then on; stored clicks keep what was
    decided for them (``events.bot_counted``), and ``refstream reconcile`` agrees.

    ``fraud_policy``: per fraud rule, ``flag`` (the default: flagged, still counted) or
    ``exclude`` (flagged and not counted); merged into the rules set before."""
    if bot_policy is not None and bot_policy not in BOT_POLICIES:
        raise ValueError(f"bot_policy: one of {', '.join(BOT_POLICIES)}")
    for rule, policy in (fraud_policy or {}).items():
        if rule not in FRAUD_RULES or policy not in FRAUD_POLICIES:
            raise ValueError(f"fraud_policy: rules {', '.join(FRAUD_RULES)}; each {' or '.join(FRAUD_POLICIES)}")
    try:
        wid = UUID(workspace_id)
    except ValueError:
        raise NotFound(f"workspace {workspace_id} not found") from None
    row = await conn.fetchrow(
        "UPDATE workspaces SET bot_policy = coalesce($2, bot_policy),"
        " fraud_policy = fraud_policy || coalesce($3::text::jsonb, '{}') WHERE id = $1"
        f" RETURNING {_WORKSPACE_COLUMNS}",
        wid,
        bot_policy,
        orjson.dumps(fraud_policy).decode() if fraud_policy else None,
    )
    if row is None:
        raise NotFound(f"workspace {workspace_id} not found")
    return _row_json(row)


async def _default_program(conn: asyncpg.Connection, workspace_id: str) -> Any:
    pid = await conn.fetchval(
        "SELECT id FROM programs WHERE workspace_id = $1 AND name = $2 ORDER BY created_at LIMIT 1",
        workspace_id,
        DEFAULT_PROGRAM,
    )
    if pid is None:
        pid = await conn.fetchval(
            "INSERT INTO programs (workspace_id, name) VALUES ($1, $2) RETURNING id",
            workspace_id,
            DEFAULT_PROGRAM,
        )
    return pid


async def _default_affiliate(conn: asyncpg.Connection, workspace_id: str, program_id: Any) -> Any:
    return await conn.fetchval(
        "INSERT INTO affiliates (workspace_id, program_id, external_id, name) VALUES ($1, $2, $3, $3)"
        " ON CONFLICT (program_id, external_id) DO UPDATE SET external_id = EXCLUDED.external_id"
        " RETURNING id",
        workspace_id,
        program_id,
        DEFAULT_AFFILIATE,
    )


_LINK_COLUMNS = (
    "id, workspace_id, program_id, affiliate_id, code, url, domain, status,"
    " clicks, unique_clicks, bot_clicks, leads, conversions, last_clicked_at, created_at"
)


async def create_link(
    conn: asyncpg.Connection,
    redis: Redis,
    keys: Keys,
    *,
    workspace_id: str,
    code: str,
    url: str | None = None,
    program_id: str | None = None,
    affiliate_id: str | None = None,
    claim: Callable[[str, str], Awaitable[bool]] | None = None,
) -> dict[str, Any]:
    """A link; a default program and affiliate are created when none are given. ``claim``:
    ``insert_link``'s."""
    async with write(conn):
        if not await conn.fetchval("SELECT 1 FROM workspaces WHERE id = $1", workspace_id):
            raise NotFound(f"workspace {workspace_id} not found")
        pid = program_id or await _default_program(conn, workspace_id)
        aid = affiliate_id or await _default_affiliate(conn, workspace_id, pid)
        if url is None:
            url = await conn.fetchval("SELECT url FROM programs WHERE id = $1", pid) or "https://example.com/"
        link_id = await insert_link(
            conn, workspace_id=workspace_id, program_id=pid, affiliate_id=aid, code=code, url=url, claim=claim
        )
    await link_written(conn, redis, keys, code)
    return _row_json(await conn.fetchrow(f"SELECT {_LINK_COLUMNS} FROM links WHERE id = $1", link_id))


async def insert_link(
    conn: asyncpg.Connection,
    *,
    workspace_id: str,
    program_id: Any,
    affiliate_id: Any,
    code: str,
    url: str,
    domain: str | None = None,
    status: str = "active",
    claim: Callable[[str, str], Awaitable[bool]] | None = None,
) -> UUID:
    """The one way a link is made (the CLI's, ``refstream dev``'s and the management API's):
    its row, its id back; ``asyncpg.UniqueViolationError`` when the code is taken. Once
    committed, ``link_written`` puts it in the edge's cache. ``claim`` (the placement's
    ``claim_code``) keeps a code unique across shards."""
    if claim is not None and not await claim(code, str(workspace_id)):
        raise asyncpg.UniqueViolationError(f"code {code!r} is another workspace's")
    link_id: UUID = await conn.fetchval(
        "INSERT INTO links (workspace_id, program_id, affiliate_id, code, url, domain, status)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
        workspace_id,
        program_id,
        affiliate_id,
        code,
        url,
        domain or hostname(url),
        status,
    )
    return link_id


async def link_written(conn: asyncpg.Connection, redis: Redis, keys: Keys, code: str) -> None:
    """After the commit of a link's create or change: the edges see it at once (a cached
    "unknown code" from before must not outlive a new link)."""
    cached = await links.fetch(conn, code)
    if cached is not None:
        await links.put_committed(redis, keys, cached)


async def show_link(conn: asyncpg.Connection, code: str) -> dict[str, Any]:
    row = await conn.fetchrow(f"SELECT {_LINK_COLUMNS} FROM links WHERE code = $1", code)
    if row is None:
        raise NotFound(f"link {code!r} not found")
    return _row_json(row)


def _row_json(row: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, UUID):
            v = str(v)
        elif hasattr(v, "isoformat"):
            v = v.isoformat()
        elif k == "fraud_policy" and isinstance(v, str):
            v = orjson.loads(v)
        out[k] = v
    return out


# -- seed 001: participants (affiliates) and their referral codes -----------------------

_CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I: read aloud, typed by hand


def readable_code(seed: str) -> str:
    """``ALEX`` + 4 characters: the participant's letters first, so codes read as names."""
    import secrets

    letters = "".join(c for c in seed.upper() if c.isascii() and c.isalpha())[:8] or "REF"
    return letters + "".join(secrets.choice(_CODE_ALPHABET) for _ in range(4))


def with_ref(url: str, code: str) -> str:
    """The program's URL as stored with ``ref=code`` appended, an older ``ref`` taken out
    (tracker.js reads the first); every other byte as stored (``ingest.contract.urls``)."""
    from urllib.parse import quote, urlsplit

    try:
        urlsplit(url)
    except ValueError:  # a program URL stored before URLs were checked: the default page's
        url = "https://example.com/"
    return with_param(without_param(url, "ref"), "ref", quote(code, safe=""))


async def referral_code(
    conn: asyncpg.Connection,
    redis: Redis,
    keys: Keys,
    *,
    workspace_id: str,
    program_id: str,
    participant_id: str,
    claim: Callable[[str, str], Awaitable[bool]] | None = None,
) -> dict[str, Any]:
    """The participant's code in the campaign, created on first call (idempotent, race-safe:
    concurrent calls for one participant serialise on an advisory lock)."""
    async with write(conn):
        program = await conn.fetchrow(
            "SELECT id, url FROM programs WHERE id = $1 AND workspace_id = $2", program_id, workspace_id
        )
        if program is None:
            raise NotFound(f"campaign {program_id} not found")
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"{program_id}/{participant_id}")
        affiliate = await conn.fetchval(
            "INSERT INTO affiliates (workspace_id, program_id, external_id) VALUES ($1, $2, $3)"
            " ON CONFLICT (program_id, external_id) DO UPDATE SET external_id = EXCLUDED.external_id RETURNING id",
            workspace_id,
            program_id,
            participant_id,
        )
        row = await conn.fetchrow(
            "SELECT code, created_at FROM links WHERE affiliate_id = $1 AND program_id = $2"
            " ORDER BY created_at LIMIT 1",
            affiliate,
            program_id,
        )
        created = None
        if row is None:
            url = program["url"] or "https://example.com/"
            for _ in range(10):
                code = readable_code(participant_id)
                try:
                    async with conn.transaction():  # a savepoint: a taken code is retried
                        link_id = await insert_link(
                            conn,
                            workspace_id=workspace_id,
                            program_id=program_id,
                            affiliate_id=affiliate,
                            code=code,
                            url=url,
                            claim=claim,
                        )
                except asyncpg.UniqueViolationError:
                    continue
                row = await conn.fetchrow("SELECT code, created_at FROM links WHERE id = $1", link_id)
                created = code
                break
            if row is None:
                raise RuntimeError("could not find a free referral code")
        # read before the commit: nothing asks Postgres after it (a failure then would be
        # answered as a refusal of a link that exists)
        link = await links.fetch(conn, created) if created else None
    if link:
        await links.put_committed(redis, keys, link)
    return {
        "code": row["code"],
        "referral_url": with_ref(program["url"] or "https://example.com/", row["code"]),
        "participant_id": participant_id,
        "created_at": row["created_at"].isoformat().replace("+00:00", "Z"),
    }


async def participant_stats(conn: asyncpg.Connection, *, workspace_id: str, participant_id: str) -> dict[str, Any]:
    """total_referrals = conversions + pending, where pending are leads not yet converted."""
    row = await conn.fetchrow(
        """
        SELECT count(l.id) AS links, coalesce(sum(l.conversions), 0)::bigint AS conversions,
               coalesce(sum(l.leads), 0)::bigint AS leads,
               (array_agg(l.code ORDER BY l.created_at) FILTER (WHERE l.id IS NOT NULL))[1] AS code
        FROM affiliates a LEFT JOIN links l ON l.affiliate_id = a.id
        WHERE a.workspace_id = $1 AND a.external_id = $2
        HAVING count(a.id) > 0
        """,
        workspace_id,
        participant_id,
    )
    if row is None:
        raise NotFound(f"participant {participant_id!r} not found")
    conversions = row["conversions"]
    pending = max(row["leads"] - conversions, 0)
    reached = await conn.fetch(
        "SELECT m.name, m.threshold, am.reached_at FROM affiliate_milestones am"
        " JOIN milestones m ON m.id = am.milestone_id JOIN affiliates a ON a.id = am.affiliate_id"
        " WHERE a.workspace_id = $1 AND a.external_id = $2 ORDER BY m.threshold",
        workspace_id,
        participant_id,
    )
    return {
        "participant_id": participant_id,
        "total_referrals": conversions + pending,
        "conversions": conversions,
        "pending": pending,
        "referral_code": row["code"],
        # beyond the seed's fields: the milestones reached ("Refer 5 friends"), each once
        "milestones": [
            {"name": r["name"], "threshold": r["threshold"], "reached_at": r["reached_at"].isoformat()} for r in reached
        ],
    }


# -- API keys ----------------------------------------------------------------------------


async def create_key(
    conn: asyncpg.Connection,
    redis: Redis,
    keys: Keys,
    *,
    workspace_id: str,
    scopes: list[str],
    affiliate_id: str | None = None,
    name: str | None = None,
    expires_in_s: int | None = None,
) -> dict[str, Any]:
    """A workspace key with ``scopes``, or a read-only affiliate key; shown once. With
    ``expires_in_s``, refused from that many seconds on (``auth.live``)."""
    if expires_in_s is not None and expires_in_s <= 0:
        raise ValueError("a key's expiry must be in the future: expires_in_s > 0")
    kind = "affiliate" if affiliate_id else "workspace"
    scopes = ["read"] if kind == "affiliate" else apikeys.check_scopes(scopes)
    key = apikeys.mint(kind)
    async with write(conn):
        if not await conn.fetchval("SELECT 1 FROM workspaces WHERE id = $1", workspace_id):
            raise NotFound(f"workspace {workspace_id} not found")
        if affiliate_id and not await conn.fetchval(
            "SELECT 1 FROM affiliates WHERE id = $1 AND workspace_id = $2", affiliate_id, workspace_id
        ):
            raise NotFound(f"affiliate {affiliate_id} not found in workspace {workspace_id}")
        row = await conn.fetchrow(
            "INSERT INTO api_keys (workspace_id, affiliate_id, kind, key_hash, prefix, scopes, name, expires_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, now() + make_interval(secs => $8))"
            " RETURNING id, workspace_id, kind, scopes, prefix, affiliate_id, expires_at",
            workspace_id,
            affiliate_id,
            kind,
            key.digest,
            key.prefix,
            scopes,
            name,
            expires_in_s,
        )
    await auth.cache_key(redis, keys, key.digest, auth.principal_from_row(row))
    expires = row["expires_at"].isoformat() if row["expires_at"] else None
    return {"api_key": key.secret, "prefix": key.prefix, "kind": kind, "scopes": scopes, "expires_at": expires}


async def revoke_key(
    conn: asyncpg.Connection, redis: Redis, keys: Keys, prefix: str, *, replicas: int = 0, wait_ms: int = 500
) -> dict[str, Any]:
    """Revoke a key: its row and its Redis entry, the entry written before the row commits.
    The entry lives a day, so a revocation committed with the entry unwritten (Redis away)
    would let the key in for that day, and its retry would find no active key to revoke:
    here a Redis that cannot take the entry (an outage, a connection redis-py closed under
    the write) rolls the revocation back, a refusal whose retry is safe (a commit lost with
    Postgres is ``OutcomeUnknown``, ``COMMIT``: a retry answers 404 if it was done). An edge
    refilling the entry meanwhile reads the key as still active, and writes only where no
    entry is. At ``REFSTREAM_ACK_DURABILITY=replicas:N`` (``replicas``) the entry reaches N
    replicas before the commit (``ingest.contract.replicated``), else the revocation is
    rolled back: a failover that lost it would leave the key's day-long entry in place."""
    async with write(conn):
        digest = await conn.fetchval(
            "UPDATE api_keys SET revoked_at = now() WHERE prefix = $1 AND revoked_at IS NULL RETURNING key_hash", prefix
        )
        if digest is None:
            raise NotFound(f"no active key with prefix {prefix!r}")
        writer = Replicated(redis, replicas, wait_ms)
        try:  # edges drop their in-process copy within REFSTREAM_KEY_CACHE_S
            await writer.send([auth.unknown(keys, bytes(digest))], "the key's revocation")
        except (RuntimeError, AttributeError) as exc:
            if not client_fault(exc):
                raise
            raise RedisConnectionError(f"a connection closed under the key cache's write: {exc!r}") from exc
        finally:
            await writer.aclose()
    return {"revoked": prefix}
