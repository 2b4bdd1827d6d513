"""Whom a lookup or an erasure names: the external id as every door now stores it
(``ingest.contract.ids``), the id as given, and every spelling of it that a version before
the rule stored as sent ("cust_1\\u00a0", a decomposed "é"): rows written before the rule
keep being found, whichever spelling the erasure is asked for.

Two kinds of subject are named by a client-chosen id: a customer (``customers`` and
``sales`` hold its external id) and a Bricqs participant, an affiliate by its external id
in every campaign (``affiliates``). ``subjects`` and ``participants`` are the one way every
route and command (``DELETE /v1/customers/{id}``, ``DELETE /v1/participants/{id}``, Bricqs'
``stats``, ``refstream erase --customer/--participant``) turns what it was given into them."""

from __future__ import annotations

import asyncpg

from ingest.contract import ids
from ingest.contract.errors import NotFound
from ingest.privacy import erasure_affiliate

# an id no normalization changes: printable ASCII, no space at either end; only the others
# are read back and normalized here (few, or none), through the customers_external,
# sales_customer and affiliates' indexes' workspace prefix
_PLAIN = r"^[!-~]([ -~]*[!-~])?$"
_CUSTOMERS = """
SELECT external_id FROM customers WHERE workspace_id = $1 AND external_id !~ $2
UNION
SELECT customer_external_id FROM sales WHERE workspace_id = $1 AND customer_external_id !~ $2
"""
_AFFILIATES = "SELECT DISTINCT external_id FROM affiliates WHERE workspace_id = $1 AND external_id !~ $2"


async def _spellings(conn: asyncpg.Connection, query: str, workspace_id: str, given: str, max_length: int) -> list[str]:
    forms = ids.stored_forms(given, max_length=max_length)
    normal = ids.normalized_or_none(given, max_length=max_length)
    if normal is not None:
        stored = {r[0] for r in await conn.fetch(query, workspace_id, _PLAIN) if r[0] is not None}
        forms += sorted(s for s in stored if s not in forms and ids.normalized_or_none(s) == normal)
    return forms


async def subjects(conn: asyncpg.Connection, workspace_id: str, given: str) -> list[str]:
    """The customer ids to erase for ``given``, the normalized one first (``ids.InvalidId``
    when none can name anyone): it, ``given`` where it differs, and the stored spellings
    that normalize to it."""
    return await _spellings(conn, _CUSTOMERS, workspace_id, given, ids.MAX_LENGTH)


async def participants(conn: asyncpg.Connection, workspace_id: str, given: str) -> list[str]:
    """The affiliates' external ids a participant id names, as ``subjects`` does a
    customer's: the normalized id first, ``given`` where it differs, and the spellings the
    workspace's affiliates hold from before the rule that normalize to it (``ids.InvalidId``
    when none can name anyone)."""
    return await _spellings(conn, _AFFILIATES, workspace_id, given, ids.MAX_LENGTH)


async def erase_participant(
    pool: asyncpg.Pool, workspace_id: str, given: str, *, by: str, archive_days: int
) -> erasure_affiliate.ErasedAffiliates:
    """Erase every affiliate of the workspace that ``given`` names (``participants``: every
    spelling, every campaign); ``NotFound`` when none, or when ``given`` can name no one."""
    try:
        async with pool.acquire() as conn:
            forms = await participants(conn, workspace_id, given)
    except ids.InvalidId:
        raise NotFound("participant not found") from None
    out = erasure_affiliate.ErasedAffiliates()
    for form in forms:
        try:
            done = await erasure_affiliate.erase(
                pool, workspace_id, participant_id=form, by=by, archive_days=archive_days
            )
        except NotFound:
            continue
        out.erasures += done.erasures
        out.cache += done.cache
        out.ips = sorted({*out.ips, *done.ips})
    if not out.erasures:
        raise NotFound("participant not found")
    return out
