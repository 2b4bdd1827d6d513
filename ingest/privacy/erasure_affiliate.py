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
    mine = _Affiliate(str(a["id"]), alias, frozenset(ips))
    for r in flags:
        doc = _doc(r["evidence"])
        if (new := mine.evidence(r["rule"], doc)) != doc:
            await conn.execute(
                "UPDATE event_flags SET evidence = $3::text::jsonb WHERE event_id = $1 AND rule = $2",
                r["event_id"],
                r["rule"],
                orjson.dumps(new).decode(),
            )
            rows["event_flags"] += 1
    # every payload of the workspace's webhooks that names the affiliate by their id (a
    # payout's, a milestone's, a commission's, a fraud flag's, a sale's link): their own
    # fields redacted there, by identity (``_Affiliate``), never another string equal to one
    # of their values (a customer of the same name, an invoice equal to their external id)
    rows["webhook_deliveries"] = 0
    held = await conn.fetch(
        "SELECT d.id, d.payload FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id WHERE"
        " w.workspace_id = $1 AND strpos(d.payload::text, $2) > 0",
        workspace_id,
        str(a["id"]),
    )
    for r in held:
        doc = _doc(r["payload"])
        if (new := mine.payload(doc)) != doc:
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


# an affiliate's own object's fields (one whose ``id`` is theirs, their ``affiliate`` or
# ``partner`` object): their name and email go, their external id becomes its pseudonym
_OWN_DATA = frozenset({"name", "email"})
_OWN_IDS = frozenset({"external_id", "externalId", "tenantId"})
# the fields that name an affiliate by their id, in an object that is something else's (a
# link, a commission, a milestone, a payout)
_NAMED_BY = ("affiliate_id", "affiliateId", "partnerId")


@dataclass(frozen=True, slots=True)
class _Affiliate:
    """An affiliate's fields in documents about them, by identity (docs/privacy.md): their own
    object's, and in an object that names them (by ``affiliate_id``) its ``affiliate_…``
    fields (a self-referral's ``affiliate_email``), and the address an ``affiliate_ip`` flag
    says they used. Never a customer's field, a milestone's name or a sale's invoice, though
    a string there may equal one of theirs."""

    id: str
    alias: str
    ips: frozenset[str] = frozenset()  # the addresses their key was used from (affiliate_ips)

    def evidence(self, rule: str, doc: Any) -> Any:
        """A flag's evidence of an event of theirs: the address of theirs it came from (an
        ``affiliate_ip`` flag's, or any rule's that names one of their own addresses, such
        as an old click_burst flag's of their own clicks)."""
        if not isinstance(doc, dict):
            return doc
        out = self._named(doc)
        ip = out.get("ip")
        if isinstance(ip, str) and (rule == "affiliate_ip" or ip in self.ips):
            out["ip"] = None
        return out

    def payload(self, doc: Any, about: bool = False) -> Any:
        """A webhook payload: ``about`` them when its link or itself names them (a fraud
        flag's evidence there is of an event of theirs)."""
        if isinstance(doc, list):
            return [self.payload(v, about) for v in doc]
        if not isinstance(doc, dict):
            return doc
        link = doc.get("link")
        names = any(doc.get(f) == self.id for f in _NAMED_BY)
        about = about or names or (isinstance(link, dict) and any(link.get(f) == self.id for f in _NAMED_BY))
        if doc.get("id") == self.id:
            return self._own(doc)
        out: dict[str, Any] = self._named(doc) if about else dict(doc)
        for k, v in out.items():
            if k in ("affiliate", "partner") and isinstance(v, dict) and (v.get("id") == self.id or names):
                out[k] = self._own(v)
            elif k == "flags" and about and isinstance(v, list):
                out[k] = [
                    {**f, "evidence": self.evidence(str(f.get("rule")), f.get("evidence"))}
                    if isinstance(f, dict)
                    else f
                    for f in v
                ]
            elif k != "link" or not about:
                out[k] = self.payload(v, about)
        return out

    def _own(self, doc: dict[str, Any]) -> dict[str, Any]:
        return {
            k: None if k in _OWN_DATA else self.alias if k in _OWN_IDS and isinstance(v, str) else v
            for k, v in doc.items()
        }

    def _named(self, doc: dict[str, Any]) -> dict[str, Any]:
        """``doc`` (about them) without its ``affiliate_…`` fields but their id."""
        return {
            k: (self.alias if k == "affiliate_external_id" and isinstance(v, str) else None)
            if k.startswith("affiliate_") and k != "affiliate_id" and v is not None
            else (self.alias if k == "tenantId" and isinstance(v, str) and doc.get("partnerId") == self.id else v)
            for k, v in doc.items()
        }


def _doc(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


def redis_commands(keys: Keys, out: ErasedAffiliates) -> list[Command]:
    """What Redis deletes at once: the rate limiter's windows of the affiliate's addresses
    (the links' cache entries are put by ``links.put_committed``)."""
    return [("DEL", keys.ratelimit(limiter, ip)) for ip in out.ips for limiter in keys.LIMITERS]
