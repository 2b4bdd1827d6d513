"""An erasure's payloads (``ingest.privacy.erasure_rows``'s last steps): the evidence of the
person's events' fraud flags and the webhook payloads whose subject is one of theirs,
redacted by identity (``erasure.redact_person``)."""

from __future__ import annotations

import uuid

import asyncpg
import orjson

from ingest.contract import erasure

_COMMISSIONS = """
SELECT id FROM commissions
WHERE workspace_id = $1 AND (customer_external_id = $2 OR source_id = ANY($3::uuid[]))
"""


def _pseudonyms(values: dict[str, str | None]) -> dict[str, str]:
    """The person's ids among ``values`` (each raw id to its pseudonym; their other values,
    an address or an email, go by where they sit: ``erasure.redact_person``)."""
    return {v: alias for v, alias in values.items() if alias is not None}


async def redact_flags(conn: asyncpg.Connection, ids: list[uuid.UUID], values: dict[str, str | None]) -> int:
    """The evidence of the person's events' flags, by identity: theirs goes (an email, an
    address), the affiliate's beside it stays (a self-referral's ``affiliate_email``)."""
    n = 0
    aliases = _pseudonyms(values)
    for r in await conn.fetch("SELECT event_id, rule, evidence FROM event_flags WHERE event_id = ANY($1::uuid[])", ids):
        doc = orjson.loads(r["evidence"]) if isinstance(r["evidence"], str) else r["evidence"]
        if (new := erasure.redact_person(doc, aliases, hers=True)) != doc:
            await conn.execute(
                "UPDATE event_flags SET evidence = $3::text::jsonb WHERE event_id = $1 AND rule = $2",
                r["event_id"],
                r["rule"],
                orjson.dumps(new).decode(),
            )
            n += 1
    return n


async def redact_deliveries_of(
    conn: asyncpg.Connection,
    workspace_id: str,
    x_alias: str | None,
    ids: list[uuid.UUID],
    values: dict[str, str | None],
) -> int:
    """The webhook payloads of the person (``x_alias``, their pseudonym): of their events
    ``ids``, their sales, and the commissions either earned (``redact_deliveries``)."""
    sales = await conn.fetch(
        "SELECT event_id FROM sales WHERE workspace_id = $1 AND customer_external_id = $2", workspace_id, x_alias
    )
    subjects = ids + [r["event_id"] for r in sales]
    # a commission.created delivery's subject is the ledger row, not an event: the person's
    # rows (renamed above) and those their events earned
    earned = await conn.fetch(_COMMISSIONS, workspace_id, x_alias, subjects)
    subjects += [r["id"] for r in earned]
    return await redact_deliveries(conn, subjects, values)


async def redact_deliveries(conn: asyncpg.Connection, ids: list[uuid.UUID], values: dict[str, str | None]) -> int:
    """The payloads whose subject is one of the person's (their events, sales, commissions),
    by identity: the customer object and the event's own fields about them, never the
    link, the affiliate, or a string of the sale's that equals one of theirs (an invoice)."""
    n = 0
    aliases = _pseudonyms(values)
    rows = await conn.fetch("SELECT id, payload FROM webhook_deliveries WHERE subject_id = ANY($1::uuid[])", ids)
    for r in rows:
        doc = orjson.loads(r["payload"]) if isinstance(r["payload"], str) else r["payload"]
        if (new := erasure.redact_person(doc, aliases, hers=True)) != doc:
            await conn.execute(
                "UPDATE webhook_deliveries SET payload = $2::text::jsonb WHERE id = $1",
                r["id"],
                orjson.dumps(new).decode(),
            )
            n += 1
    return n
