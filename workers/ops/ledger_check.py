"""``refstream commission check``: the commission ledger against its rules applied to the
whole history (``ingest.contract.earnings``), each sale and lead whose standing differs.

The workers write the ledger row by row as sales and leads arrive, in any order; this
reads the history in one snapshot (REPEATABLE READ: a batch committing meanwhile shows up
whole or not at all) and recomputes it with the pure function the tests' checkers use, so
the ledger and the rules can be told apart from the outside. It reports and never writes:
the ledger is never edited, and a difference is a bug to look at (or rules changed over the
history: the workers apply the rules in force when a row is stored, the check today's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg
import structlog

from ingest.contract import earnings
from ingest.contract.commission import Rules

log = structlog.get_logger("workers.ledger_check")


@dataclass(frozen=True, slots=True)
class Difference:
    """A sale's or lead's net standing in the ledger, against what the rules say."""

    kind: str  # "sale" | "lead"
    source_id: str
    expected: tuple[int, str] | None
    stored: tuple[int, str] | None

    def to_dict(self) -> dict[str, Any]:
        def cell(v: tuple[int, str] | None) -> dict[str, Any] | None:
            return None if v is None else {"amount": v[0], "currency": v[1]}

        return {
            "kind": self.kind,
            "source_id": self.source_id,
            "expected": cell(self.expected),
            "stored": cell(self.stored),
        }


async def history(
    conn: asyncpg.Connection, workspace_id: str | None = None
) -> tuple[dict[str, Rules], list[earnings.Lead], list[earnings.Sale], list[earnings.Row]]:
    """The rules, counted leads, sales and ledger rows of one workspace (None: all), as the
    pure functions take them. Run it in one snapshot."""
    ws = UUID(workspace_id) if workspace_id else None
    rules = {r["id"]: Rules.from_json(r["commission"]) for r in await conn.fetch(earnings.RULES_SQL, ws)}
    leads = [earnings.Lead(**dict(r)) for r in await conn.fetch(earnings.LEADS_SQL, ws)]
    sales = [earnings.Sale(**dict(r)) for r in await conn.fetch(earnings.SALES_SQL, ws)]
    rows = [earnings.Row(**dict(r)) for r in await conn.fetch(earnings.LEDGER_SQL, ws)]
    return rules, leads, sales, rows


async def _histories(
    conn: asyncpg.Connection, workspace_id: str | None
) -> tuple[dict[str, Rules], list[earnings.Lead], list[earnings.Sale], list[earnings.Row]]:
    """``history``, without a moved-away workspace's old copy (``workspaces.moved_to``: its
    ledger is checked on the shard it is on now): then each other workspace's, put together."""
    if workspace_id is not None or not await conn.fetchval(_ANY_MOVED):
        return await history(conn, workspace_id)
    rules: dict[str, Rules] = {}
    leads: list[earnings.Lead] = []
    sales: list[earnings.Sale] = []
    rows: list[earnings.Row] = []
    for r in await conn.fetch("SELECT id::text FROM workspaces WHERE moved_to IS NULL ORDER BY id"):
        theirs = await history(conn, r["id"])
        rules.update(theirs[0])
        leads += theirs[1]
        sales += theirs[2]
        rows += theirs[3]
    return rules, leads, sales, rows


_ANY_MOVED = "SELECT EXISTS (SELECT 1 FROM workspaces WHERE moved_to IS NOT NULL)"


async def check(pool: asyncpg.Pool, workspace_id: str | None = None, *, import_earns: bool = False) -> list[Difference]:
    """Each sale and lead whose net in the ledger differs from the rules applied to the history."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        rules, leads, sales, rows = await _histories(conn, workspace_id)
    want = earnings.expected(rules, leads, sales, import_earns=import_earns)
    found = [Difference(k[0], str(k[1]), x, s) for k, x, s in earnings.differences(want, earnings.standing(rows))]
    log.info("ledger.check", differences=len(found), sales=len(sales), leads=len(leads), rows=len(rows))
    return found
