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
from ingest.manage.admin import NotFound
from ingest.manage.manage import as_uuid, row_json

# the given rules over the stored ones, in one statement: two changes at once both apply
_SET_RULES = (
    "UPDATE programs SET commission = commission || $3::text::jsonb WHERE id = $1 AND workspace_id = $2"
    " RETURNING id, commission::text"
)
_COLUMNS = (
    "id, seq, program_id, affiliate_id, link_id, kind, source_id, customer_external_id, amount, currency, status,"
    " earned_at, approve_after, created_at"
)
FILTERS = {"affiliate_id": "affiliate_id", "program_id": "program_id", "status": "status", "currency": "currency"}


async def set_rules(
    conn: asyncpg.Connection, workspace_id: str, program_id: str, given: dict[str, Any]
) -> dict[str, Any]:
    """Change the rules ``given``, the others kept; the program's id and its rules back."""
    async with write(conn):
        # as text both ways: the same whether the connection has a jsonb codec (the edge's pool) or not
        row = await conn.fetchrow(_SET_RULES, as_uuid(program_id), UUID(workspace_id), orjson.dumps(given).decode())
    if row is None:
        raise NotFound(f"program {program_id} not found")
    return {"program_id": str(row["id"]), "commission": Rules.from_json(orjson.loads(row["commission"])).as_json()}


def commissions_query(filters: tuple[str, ...], *, affiliate: bool, after: bool) -> str:
    """Newest first (``seq``), of the workspace (``commissions_workspace``) or one affiliate
    (``commissions_affiliate``, the affiliate's own view), filtered, before a cursor."""
    where = ["workspace_id = $1"] + (["affiliate_id = $2"] if affiliate else [])
    where += [f"{FILTERS[f]} = ${len(where) + 1 + i}" for i, f in enumerate(filters)]
    if after:
        where.append(f"seq < ${len(where) + 1}")
    return f"SELECT {_COLUMNS} FROM commissions WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ${len(where) + 1}"


async def list_commissions(
    conn: asyncpg.Connection, workspace_id: str, filters: dict[str, str], before: str | None, limit: int,
    *, affiliate_id: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A page of the ledger, its totals per currency and status over the page's filters,
    and the next page's cursor (None: the last page)."""
    names = tuple(f for f in FILTERS if f in filters and not (affiliate_id and f == "affiliate_id"))
    args: list[Any] = [UUID(workspace_id)] + ([UUID(affiliate_id)] if affiliate_id else [])
    args += [as_uuid(filters[f]) if f.endswith("_id") else filters[f] for f in names]
    if before is not None:
        if not before.isdigit():
            raise NotFound(f"cursor {before!r} not found")
        args.append(int(before))
    rows = await conn.fetch(commissions_query(names, affiliate=bool(affiliate_id), after=before is not None),
                            *args, limit + 1)  # fmt: skip
    page = []
    for r in rows[:limit]:
        d = row_json(r)
        d.pop("seq")
        page.append(d)
    return {"data": page, "next": str(rows[limit - 1]["seq"]) if len(rows) > limit else None}
