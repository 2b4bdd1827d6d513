"""An erasure's customers rows (``ingest.privacy.erasure_rows``): those of the person's
visitors read behind their locks (``read``), then each scrubbed (``scrub``): a row theirs
alone renamed to its pseudonyms with its contact fields gone (or merged into the row the
workers made under the pseudonym already), a row of a visitor another customer shares
given back the fields that customer's events give it."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson

from ingest.contract import erasure
from ingest.contract.erasure import EXTERNAL, VISITOR
from ingest.privacy import erasure_shared

_CUSTOMERS = """
SELECT id, visitor_id, external_id, email, name, avatar_url FROM customers
WHERE workspace_id = $1 AND (external_id = $2 OR visitor_id = ANY($3::text[]))
ORDER BY id
"""
_UPDATE_CUSTOMER = """
UPDATE customers SET external_id = $3, visitor_id = $2,
    email = NULL, name = NULL, avatar_url = NULL
WHERE id = $1
"""


async def read(
    conn: asyncpg.Connection,
    key: bytes,
    workspace_id: str,
    external_id: str | None,
    visitors: list[str],
    shared_visitors: Sequence[str],
    values: dict[str, str | None],
) -> tuple[list[asyncpg.Record], set[uuid.UUID]]:
    """The customers rows of the person and of their ``visitors`` and ``shared_visitors``,
    and the ids of those theirs alone (their contact fields put in ``values``, to go)."""
    people = await conn.fetch(_CUSTOMERS, workspace_id, external_id, [*visitors, *shared_visitors])
    # each row taken for theirs alone decided again behind its lock: another customer's lead
    # may have been stored from the browser since its visitor was found theirs alone
    people, shared_visitors = await erasure_shared.decided(
        conn, key, workspace_id, external_id, people, shared_visitors
    )
    mine = {c["id"] for c in people if c["visitor_id"] not in shared_visitors}
    for c in people:
        if c["id"] in mine:
            for v in (c["email"], c["name"], c["avatar_url"]):
                if v:
                    values[v] = None
    return people, mine


async def scrub(
    conn: asyncpg.Connection,
    key: bytes,
    workspace_id: str,
    external: tuple[str | None, str | None],
    people: list[asyncpg.Record],
    mine: set[uuid.UUID],
    theirs: set[uuid.UUID],
) -> int:
    """Each of ``read``'s rows scrubbed (``external``: the erased id and its pseudonym;
    ``theirs``: the person's events): the count of rows."""
    for c in people:
        if c["id"] not in mine:  # a browser another customer signed up from too: their fields alone
            await _unshare(conn, key, workspace_id, c["id"], external, theirs)
            continue
        v = c["visitor_id"]
        alias = v if erasure.is_pseudonym(v) else erasure.pseudonym(key, VISITOR, v)
        x = c["external_id"]  # the erased id, or the one this visitor's row holds
        x_row = x if x is None or erasure.is_pseudonym(x) else erasure.pseudonym(key, EXTERNAL, x, workspace_id)
        if await _merged(conn, workspace_id, c["id"], alias):
            continue
        await conn.execute(_UPDATE_CUSTOMER, c["id"], alias, x_row)
    return len(people)


# a customers row's contact fields (the column, the events' payload key) and the events of
# its visitor that carry a customer, newest first: what the row holds without the person
_CONTACT = (("external_id", "external_id"), ("email", "email"), ("name", "customer_name"), ("avatar_url", "avatar"))
_ROW = """
SELECT visitor_id, external_id, external_id_event, email, email_event, name, name_event, avatar_url, avatar_url_event
FROM customers WHERE id = $1
"""
_OTHERS_OF = """
SELECT event_id, received_at, customer_external_id, payload FROM events
WHERE workspace_id = $1 AND visitor_id = $2 AND customer_external_id IS NOT NULL AND NOT (event_id = ANY($3::uuid[]))
ORDER BY received_at DESC, event_id DESC
"""


async def _unshare(
    conn: asyncpg.Connection,
    key: bytes,
    workspace_id: str,
    row: uuid.UUID,
    external: tuple[str | None, str | None],
    theirs: set[uuid.UUID],
) -> None:
    """A customers row of a visitor the person shares with another customer (one row per
    visitor): each contact field the person's events gave it (its ``…_event``), or their
    external id, becomes what the visitor's other customers' events give it (the latest
    that carries one, as the workers would have made it without the person's), else nothing.
    The visitor id, the other customer's fields, the first touch and the status stay."""
    c = await conn.fetchrow(_ROW, row)
    hers = [
        column
        for column, _ in _CONTACT
        if c[column] is not None
        and (c[f"{column}_event"] in theirs or (column == "external_id" and c[column] in external))
    ]
    if not hers:
        return
    others = []
    for r in await conn.fetch(_OTHERS_OF, workspace_id, c["visitor_id"], sorted(theirs)):
        x = r["customer_external_id"]
        if x in external or erasure.is_pseudonym(x):
            continue
        payload = r["payload"] if isinstance(r["payload"], dict) else orjson.loads(r["payload"] or "{}")
        others.append((r, {**payload, "external_id": x}))
    if others:  # an erased person's, under another spelling, is no one else's
        digests = {erasure.digest(key, EXTERNAL, p["external_id"], workspace_id) for _, p in others}
        gone = {bytes(d) for d in await conn.fetchval(ERASED, list(digests), workspace_id)}
        others = [
            (r, p) for r, p in others if erasure.digest(key, EXTERNAL, p["external_id"], workspace_id) not in gone
        ]
    sets: list[str] = []
    args: list[Any] = [row]
    for column, field_ in _CONTACT:
        if column not in hers:
            continue
        by = next(((r, p[field_]) for r, p in others if isinstance(p.get(field_), str) and p[field_]), None)
        value, at, event = (by[1], by[0]["received_at"], by[0]["event_id"]) if by else (None, None, None)
        n = len(args)
        sets.append(f"{column} = ${n + 1}, {column}_at = ${n + 2}, {column}_event = ${n + 3}")
        args += [value, at, event]
    await conn.execute(f"UPDATE customers SET {', '.join(sets)} WHERE id = $1", *args)


ERASED = """
SELECT array(SELECT digest FROM erased_ids WHERE digest = ANY($1::bytea[]) AND workspace_id = $2)
"""
_TWIN = "SELECT id FROM customers WHERE workspace_id = $1 AND visitor_id = $2 AND id <> $3"


async def _merged(conn: asyncpg.Connection, workspace_id: str, row: uuid.UUID, alias: str) -> bool:
    """Where the workers already made the visitor's row under its pseudonym (from a scrubbed
    copy of an event that reached them before this scrub did), the two rows become one.
    Whether this row went (the other, scrubbed already, stays)."""
    twin = await conn.fetchval(_TWIN, workspace_id, alias, row)
    if twin is None:
        return False
    first = await conn.fetchval(
        "SELECT id FROM customers WHERE id = ANY($1::uuid[]) ORDER BY first_seen_at, id LIMIT 1", [row, twin]
    )
    gone = twin if first == row else row
    await conn.execute(
        "UPDATE customers k SET status = greatest(k.status, d.status), last_seen_at = greatest(k.last_seen_at,"
        " d.last_seen_at) FROM customers d WHERE k.id = $1 AND d.id = $2",
        first,
        gone,
    )
    await conn.execute("DELETE FROM customers WHERE id = $1", gone)
    return gone == row
