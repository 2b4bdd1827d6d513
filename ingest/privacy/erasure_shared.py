"""A customers row an erasure takes for the person's alone, decided behind its lock.

refstream keeps one customers row per visitor, and two people may sign up from one browser
(docs/privacy.md, *A browser two customers share*). Whether a visitor was the erased
person's alone is read before their rows are scrubbed: by the erasure's ledger step, an
earlier pass, a late lead's batch (``ingest.privacy.erasure``, ``erasure_late``). A batch
storing another customer's lead from that browser does not wait for an erasure (the ledger
does not name that customer), and may commit in between: its fields on the row, or a row
of its own for the visitor (the generative test's seed 3004: the other customer's row was
then taken under the pseudonym, and ``GET /v1/customers/<other>`` answered 404).

So each row that would be taken as the person's is locked and read again, and its visitor
asked again, after the lock, whether another customer's lead or sale carries it: a batch
that committed before is seen (its events and its row's fields commit together); one that
upserts the row later waits for the erasure's transaction and finds the row as it leaves
it (under the pseudonym: the visitor's row is then a new one, of that batch's events).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import asyncpg

from ingest.contract import erasure
from ingest.contract.erasure import EXTERNAL

_LOCK = """
SELECT id, visitor_id, external_id, email, name, avatar_url FROM customers WHERE id = ANY($1::uuid[])
ORDER BY id FOR UPDATE
"""
# another customer's lead or sale carrying one of the visitors (events_workspace_visitor_known)
_CARRIED = """
SELECT DISTINCT visitor_id, customer_external_id FROM events
WHERE workspace_id = $1 AND visitor_id = ANY($2::text[]) AND customer_external_id IS NOT NULL
  AND customer_external_id <> $3 AND customer_external_id NOT LIKE 'erased-%'
"""
_ERASED = """
SELECT array(SELECT digest FROM erased_ids WHERE digest = ANY($1::bytea[]) AND workspace_id = $2)
"""


async def decided(
    conn: asyncpg.Connection,
    key: bytes,
    workspace_id: str,
    external_id: str | None,
    people: Sequence[asyncpg.Record],
    shared_visitors: Sequence[str],
) -> tuple[list[asyncpg.Record], list[str]]:
    """``people`` (customers rows as ``ingest.privacy.erasure`` reads them), those of a
    visitor not in ``shared_visitors`` locked and read again (a row gone since is left out),
    and the shared visitors with those of the locked rows that another customer's lead or
    sale carries by now: another customer is one that is not ``external_id``, nor a
    pseudonym, nor named by the workspace's ledger (``erasure.held_by_others``'s rule, asked
    of the events: the row itself names whom the caller's step found)."""
    shared = list(shared_visitors)
    alone = [c["id"] for c in people if c["visitor_id"] not in shared]
    if not alone:
        return list(people), shared
    now: dict[uuid.UUID, asyncpg.Record] = {c["id"]: c for c in await conn.fetch(_LOCK, alone)}
    people = [now.get(c["id"], c) for c in people if c["id"] in now or c["visitor_id"] in shared]
    visitors = sorted({v for c in now.values() if (v := c["visitor_id"]) not in shared and not erasure.is_pseudonym(v)})
    if not visitors:
        return people, shared
    carried = [
        (r["visitor_id"], r["customer_external_id"])
        for r in await conn.fetch(_CARRIED, workspace_id, visitors, external_id or "")
        if not erasure.is_pseudonym(r["customer_external_id"])
    ]
    if not carried:
        return people, shared
    digests = {erasure.digest(key, EXTERNAL, w, workspace_id): w for w in sorted({w for _, w in carried})}
    gone = {bytes(d) for d in await conn.fetchval(_ERASED, list(digests), workspace_id)}
    others = {w for d, w in digests.items() if d not in gone}
    shared += sorted({v for v, w in carried if w in others})
    return people, shared
