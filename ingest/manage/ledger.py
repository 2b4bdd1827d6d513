"""The commission ledger's management side: a program's rules, and the ledger's reads.

Rules are written here and applied by the workers (``ingest.contract.commission`` says how;
``workers.consumer.commissions`` applies them): a change applies to the sales and leads
stored after it, never to the ledger's existing rows.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import asyncpg
import orjson

from ingest.contract.commission import Rules
from ingest.contract.connections import write
from ingest.contract.errors import Conflict, NotFound
from ingest.ledger import outbox
from ingest.ledger.outbox import WebhookEvent
from ingest.manage.manage import as_uuid, query_value, row_json


def _flats(c: str) -> str:
    """SQL: the rules ``c`` with an older single ``sale_flat`` number as ``sale_flats``, in
    the program's currency (none when it is 0)."""
    return f"""CASE WHEN jsonb_typeof({c}->'sale_flat') IS DISTINCT FROM 'number' THEN {c} - 'sale_flat'
        ELSE ({c} - 'sale_flat') || jsonb_build_object('sale_flats', CASE
            WHEN ({c}->>'sale_flat')::numeric > 0
            THEN jsonb_build_object(lower(coalesce({c}->>'lead_currency', 'usd')), {c}->'sale_flat')
            ELSE '{{}}'::jsonb END) END"""


# the given rules over the stored ones, in one statement: two changes at once both apply.
# sale_flat, a mapping of currency to minor units, is stored as sale_flats (an older
# worker reads no flat amount from it, never a wrong one); an older single number, stored
# (where migrate has not rewritten it yet) or given, is in the program's currency
# (lead_currency), as schema.sql rewrote the stored ones
_SET_RULES = f"""
UPDATE programs
SET commission = (SELECT {_flats("m.c")} FROM (SELECT ({_flats("commission")}) || $3::text::jsonb AS c) m)
WHERE id = $1 AND workspace_id = $2
RETURNING id, commission::text
"""
_COLUMNS = (
    "id, seq, program_id, affiliate_id, link_id, kind, source_id, customer_external_id, amount, currency, status,"
    " earned_at, approve_after, created_at"
)
# what the ledger's lists filter on (payouts: affiliate_id, status, currency)
FILTERS = {"affiliate_id": "affiliate_id", "program_id": "program_id", "status": "status", "currency": "currency"}


async def set_rules(
    conn: asyncpg.Connection, workspace_id: str, program_id: str, given: dict[str, Any]
) -> dict[str, Any]:
    """Change the rules ``given``, the others kept; the program's id and its rules back."""
    if isinstance(given.get("sale_flat"), dict):
        given = {**{k: v for k, v in given.items() if k != "sale_flat"}, "sale_flats": given["sale_flat"]}
    async with write(conn):
        # as text both ways: the same whether the connection has a jsonb codec (the edge's pool) or not
        row = await conn.fetchrow(_SET_RULES, as_uuid(program_id), UUID(workspace_id), orjson.dumps(given).decode())
    if row is None:
        raise NotFound(f"program {program_id} not found")
    return {"program_id": str(row["id"]), "commission": Rules.from_json(orjson.loads(row["commission"])).as_json()}


def page_query(table: str, filters: tuple[str, ...], *, affiliate: bool, after: bool) -> str:
    """Newest first (``seq``) of a ledger table: the workspace's (``<table>_workspace``) or one
    affiliate's (``<table>_affiliate``, the affiliate's own view), filtered, before a cursor."""
    where = ["workspace_id = $1"] + (["affiliate_id = $2"] if affiliate else [])
    where += [f"{FILTERS[f]} = ${len(where) + 1 + i}" for i, f in enumerate(filters)]
    if after:
        where.append(f"seq < ${len(where) + 1}")
    columns = _COLUMNS if table == "commissions" else _PAYOUT_COLUMNS
    return f"SELECT {columns} FROM {table} WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ${len(where) + 1}"


async def page(
    conn: asyncpg.Connection,
    table: str,
    workspace_id: str,
    filters: dict[str, str],
    before: str | None,
    limit: int,
    *,
    affiliate_id: str | None = None,
) -> dict[str, Any]:
    """A page of ``commissions`` or ``payouts`` and the next page's cursor (None: the last)."""
    names = tuple(f for f in FILTERS if f in filters and not (affiliate_id and f == "affiliate_id"))
    args: list[Any] = [UUID(workspace_id)] + ([as_uuid(affiliate_id)] if affiliate_id else [])
    args += [as_uuid(filters[f]) if f.endswith("_id") else query_value(f, filters[f]) for f in names]
    if before is not None:
        if not (before.isascii() and before.isdigit() and len(before) <= 18):
            raise NotFound(f"cursor {before[:40]!r} not found")
        args.append(int(before))
    query = page_query(table, names, affiliate=bool(affiliate_id), after=before is not None)
    rows = await conn.fetch(query, *args, limit + 1)
    out = []
    for r in rows[:limit]:
        d = row_json(r)
        d.pop("seq")
        out.append(d)
    return {"data": out, "next": str(rows[limit - 1]["seq"]) if len(rows) > limit else None}


_PAYOUT_COLUMNS = "id, seq, affiliate_id, currency, amount, commissions, status, created_at, paid_at"
# the affiliate's approved, unpaid commissions in the currency, locked in id order
_UNPAID = """
SELECT id, amount FROM commissions
WHERE workspace_id = $1 AND affiliate_id = $2 AND currency = $3 AND status = 'approved' AND payout_id IS NULL
ORDER BY id FOR UPDATE
"""
_NEW_PAYOUT = f"""
INSERT INTO payouts (workspace_id, affiliate_id, currency, amount, commissions) VALUES ($1, $2, $3, $4, $5)
RETURNING {_PAYOUT_COLUMNS}
"""
_PAID = f"""
UPDATE payouts SET status = 'paid', paid_at = now() WHERE id = $1 AND workspace_id = $2 AND status = 'pending'
RETURNING {_PAYOUT_COLUMNS}
"""


class NothingToPay(Conflict):
    """The affiliate has no approved, unpaid commission in that currency that sums above 0."""


async def create_payout(
    conn: asyncpg.Connection, workspace_id: str, affiliate_id: str, currency: str
) -> dict[str, Any]:
    """A payout of the affiliate's approved, unpaid commissions in ``currency``, reversals
    included; ``NothingToPay`` when they sum to nothing (a reversal waits for the next)."""
    async with write(conn):
        rows = await conn.fetch(_UNPAID, UUID(workspace_id), as_uuid(affiliate_id), currency)
        total = sum(r["amount"] for r in rows)
        if total <= 0:
            raise NothingToPay(f"no approved commission of affiliate {affiliate_id} in {currency} to pay")
        payout = await conn.fetchrow(_NEW_PAYOUT, UUID(workspace_id), as_uuid(affiliate_id), currency, total, len(rows))
        await conn.execute(
            "UPDATE commissions SET payout_id = $1 WHERE id = ANY($2::uuid[])", payout["id"], [r["id"] for r in rows]
        )
    return _payout(payout)


async def mark_paid(conn: asyncpg.Connection, workspace_id: str, payout_id: str) -> dict[str, Any]:
    """The payout, and its commissions, paid; a payout paid already is answered as it is."""
    async with write(conn):
        payout = await conn.fetchrow(_PAID, as_uuid(payout_id), UUID(workspace_id))
        if payout is not None:
            await conn.execute("UPDATE commissions SET status = 'paid' WHERE payout_id = $1", payout["id"])
            # in the write's transaction; the workers' sweep enqueues its delivery within a minute or two
            await outbox.record_deliveries(
                conn, [WebhookEvent(workspace_id, "payout.paid", payout["id"], "", _payout(payout))]
            )
        else:
            payout = await conn.fetchrow(
                f"SELECT {_PAYOUT_COLUMNS} FROM payouts WHERE id = $1 AND workspace_id = $2",
                as_uuid(payout_id),
                UUID(workspace_id),
            )
    if payout is None:
        raise NotFound(f"payout {payout_id} not found")
    return _payout(payout)


def _payout(row: Any) -> dict[str, Any]:
    out = row_json(row)
    out.pop("seq", None)
    return out
