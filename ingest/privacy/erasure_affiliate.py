"""An affiliate's erasure (a Bricqs participant is an affiliate: docs/privacy.md).

An affiliate is a partner, and a person: their name, email and external id (a
participant's id) are in ``affiliates``, the addresses their key was used from in
``affiliate_ips``, and copies of those in fraud evidence (``event_flags``: a self-referral's
``affiliate_email``), in webhook payloads (``webhook_deliveries``), in the link cache
(each of their links names their external id) and in the rate limiter's windows.

``erase`` takes them out, in one transaction: the row stays, so every link, commission,
payout and counter keeps its affiliate and its amounts (money records stay, the person's
data goes); its external id becomes a pseudonym (``erased-`` and 16 hex digits, a
function of the program, the id and the ledger's salt), its name and email go; their
addresses go; the evidence and payloads that hold any of those values are redacted. An
``erasures`` row records it (its subject the digest of the affiliate's id, never a value),
so ``GET /v1/erasures/{id}`` and ``refstream erase --status`` follow it, and the ledger's
copy outside Postgres (``ingest.privacy.erasure_copy``) brings it back after a restore.
The caller puts the links' cache entries (``cache``) and deletes the windows (``ips``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from ingest.contract import erasure, links
from ingest.contract.connections import Command
from ingest.contract.errors import NotFound
from ingest.contract.keys import Keys
from ingest.privacy.erasure import ROW, describe

AFFILIATE = "a"  # the ledger's kind for an affiliate's id (a subject, never in erased_ids)

_LEDGER = """
INSERT INTO erasures (id, workspace_id, subject, requested_by, since, archive_due, postgres_at, done)
VALUES ($1, $2, $3, $4, NULL, now() + make_interval(days => $5), now(), $6::text::jsonb)
ON CONFLICT (workspace_id, subject) DO UPDATE
    SET postgres_at = now(), redis_at = NULL, archive_at = NULL, done = EXCLUDED.done,
        generation = erasures.generation + 1
RETURNING id
"""


@dataclass(slots=True)
class ErasedAffiliates:
    """What ``erase`` did: one erasure per affiliate, and what the caller does in Redis."""

    erasures: list[dict[str, Any]] = field(default_factory=list)
    # in memory only, never stored or logged: the links to cache again, the addresses' windows
    cache: list[links.LinkInfo] = field(default_factory=list)
    ips: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"erasures": self.erasures}


def subject(key: bytes, affiliate_id: uuid.UUID) -> bytes:
    return erasure.digest(key, AFFILIATE, str(affiliate_id))


async def erase(
    pool: asyncpg.Pool,
    workspace_id: str,
    *,
    affiliate_id: str | None = None,
    participant_id: str | None = None,
    by: str,
    archive_days: int,
) -> ErasedAffiliates:
    """Erase the affiliate ``affiliate_id`` (refstream's id), or every affiliate of the
    workspace whose external id is ``participant_id`` (a Bricqs participant, one per
    campaign). ``NotFound`` when there is none."""
    out = ErasedAffiliates()
    async with pool.acquire() as conn, conn.transaction():
        if affiliate_id is not None:
            try:
                wanted = uuid.UUID(affiliate_id)
            except ValueError:
                raise NotFound("affiliate not found") from None
            found = await conn.fetch(
                "SELECT * FROM affiliates WHERE id = $1 AND workspace_id = $2 FOR UPDATE", wanted, workspace_id
            )
        else:
            found = await conn.fetch(
                "SELECT * FROM affiliates WHERE external_id = $1 AND workspace_id = $2 ORDER BY id FOR UPDATE",
                participant_id,
                workspace_id,
            )
        if not found:
            raise NotFound("participant not found" if affiliate_id is None else "affiliate not found")
        key = await erasure.salt(conn)
        for a in found:
            rows, ips = await _scrub(conn, key, workspace_id, a)
            out.ips += ips
            made = await conn.fetchval(
                _LEDGER,
                uuid.uuid4(),
                workspace_id,
                subject(key, a["id"]),
                by,
                archive_days,
                orjson.dumps({"postgres": rows}).decode(),
            )
            out.erasures.append(describe(await conn.fetchrow(ROW + " WHERE id = $1", made)))
            for code in await conn.fetch("SELECT code FROM links WHERE affiliate_id = $1 ORDER BY code", a["id"]):
                if (info := await links.fetch(conn, code["code"])) is not None:
                    out.cache.append(info)
    out.ips = sorted(set(out.ips))
    return out


async def _scrub(
    conn: asyncpg.Connection, key: bytes, workspace_id: str, a: asyncpg.Record
) -> tuple[dict[str, int], list[str]]:
    x = a["external_id"]
    alias = x if erasure.is_pseudonym(x) else erasure.pseudonym(key, AFFILIATE, f"{a['program_id']}\x1f{x}")
    ips = [
        r["ip"] for r in await conn.fetch("SELECT host(ip) AS ip FROM affiliate_ips WHERE affiliate_id = $1", a["id"])
    ]
    values: dict[str, str | None] = {v: None for v in (a["name"], a["email"], *ips) if v}
    if x != alias:
        values[x] = alias
    await conn.execute(
        "UPDATE affiliates SET external_id = $2, name = NULL, email = NULL WHERE id = $1", a["id"], alias
    )
    rows = {"affiliates": 1, "affiliate_ips": len(ips)}
    await conn.execute("DELETE FROM affiliate_ips WHERE affiliate_id = $1", a["id"])
    rows["event_flags"] = 0
    flags = await conn.fetch(
        # the flag's affiliate is its event's (a flag holds none of its own since schema 17)
        "SELECT f.event_id, f.rule, f.evidence FROM event_flags f JOIN events e ON e.event_id = f.event_id"
        " WHERE f.workspace_id = $1 AND e.affiliate_id = $2",
        workspace_id,
        a["id"],
    )
    for r in flags:
        doc = _doc(r["evidence"])
        if (new := erasure.redact(doc, values)) != doc:
            await conn.execute(
                "UPDATE event_flags SET evidence = $3::text::jsonb WHERE event_id = $1 AND rule = $2",
                r["event_id"],
                r["rule"],
                orjson.dumps(new).decode(),
            )
            rows["event_flags"] += 1
    # every payload of the workspace's webhooks that holds the affiliate's id or one of
    # their values (a payout's, a milestone's, a fraud flag's evidence)
    rows["webhook_deliveries"] = 0
    needles = sorted({str(a["id"]), *values})
    held = await conn.fetch(
        "SELECT d.id, d.payload FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id WHERE"
        " w.workspace_id = $1 AND EXISTS (SELECT 1 FROM unnest($2::text[]) n WHERE strpos(d.payload::text, n) > 0)",
        workspace_id,
        needles,
    )
    for r in held:
        doc = _doc(r["payload"])
        if (new := _redact_affiliate(doc, values, str(a["id"]))) != doc:
            await conn.execute(
                "UPDATE webhook_deliveries SET payload = $2::text::jsonb WHERE id = $1",
                r["id"],
                orjson.dumps(new).decode(),
            )
            rows["webhook_deliveries"] += 1
    return rows, ips


async def again(conn: asyncpg.Connection, key: bytes, workspace_id: str, erased: bytes) -> bool:
    """An affiliate's erasure that a restore of Postgres lost, put back from its copy
    (``ingest.privacy.erasure_copy``): the affiliate its subject names scrubbed again (their
    links' cache entries follow at the workers' refresh). Whether one was found."""
    for a in await conn.fetch("SELECT * FROM affiliates WHERE workspace_id = $1 FOR UPDATE", workspace_id):
        if subject(key, a["id"]) == erased:
            rows, _ = await _scrub(conn, key, workspace_id, a)
            await conn.execute(
                "UPDATE erasures SET postgres_at = now(), done = $3::text::jsonb"
                " WHERE workspace_id = $1 AND subject = $2",
                workspace_id,
                erased,
                orjson.dumps({"postgres": rows}).decode(),
            )
            return True
    return False


def _redact_affiliate(doc: Any, values: dict[str, str | None], affiliate_id: str) -> Any:
    """``erasure.redact``, and the ``name`` and ``email`` of an object that is this affiliate
    (its ``id`` or ``affiliate_id``) emptied, whatever their value was when it was sent."""
    doc = erasure.redact(doc, values)
    if isinstance(doc, list):
        return [_redact_affiliate(v, values, affiliate_id) for v in doc]
    if isinstance(doc, dict):
        out = {k: _redact_affiliate(v, values, affiliate_id) for k, v in doc.items()}
        if affiliate_id in (out.get("id"), out.get("affiliate_id")):
            out = {
                f: (None if f in ("name", "email", "affiliate_name", "affiliate_email") else v) for f, v in out.items()
            }
        return out
    return doc


def _doc(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


def redis_commands(keys: Keys, out: ErasedAffiliates) -> list[Command]:
    """What Redis deletes at once: the rate limiter's windows of the affiliate's addresses
    (the links' cache entries are put by ``links.put_committed``)."""
    return [("DEL", keys.ratelimit(limiter, ip)) for ip in out.ips for limiter in keys.LIMITERS]
