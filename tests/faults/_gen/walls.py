"""The checker's part for other tenants and for what the processes wrote (``tenants.py``):

- ``tenant_wall``: a workspace's customer of a shared id that the workspace never erased is
  whole once the run is over: their row with their email, whatever another workspace erased;
  workspace ``c`` (made, erased in, deleted) left no row anywhere;
- ``unattributed``: a sale of a customer whose lead (60 days old, past the cookie window) is
  stored, under a ``lifetime`` rule, not attributed to the lead's link;
- ``crash``: a crash line in any process's log (a traceback, ``consumer.crashed``, an
  ``internal_error`` answer);
- ``personal_in_log``: a customer id, an email or a client's address in any process's log or
  any command's output.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

from ..._logscan import find_crashes, spellings
from .._checks import Checker
from .history import History, Op
from .ops import World
from .tenants import email_of

# tables with a workspace_id: a deleted workspace leaves none of its rows in any of them (a
# partitioned table's rows counted through it: its partitions are each shard's own)
SCOPED = """SELECT table_name FROM information_schema.columns
WHERE column_name = 'workspace_id' AND table_schema = 'public'
  AND table_name IN (SELECT c.relname FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace
                     AND c.relkind IN ('r', 'p') AND NOT c.relispartition)"""


def _erased(history: History) -> set[tuple[str, str]]:
    """(customer, tag) of every erase that may have happened (answered or not)."""
    return {
        (op.echo["customer"], op.echo.get("tag", "a"))
        for op in history.ops.values()
        if op.kind == "erase" and op.skipped is None and any(a.outcome != "refused" for a in op.attempts)
    }


async def problems(check: Checker, history: History, world: World) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"tenant_wall": [], "unattributed": []}
    erased = _erased(history)
    for op in history.ops.values():
        if op.n < 600_000 or op.skipped is not None or not any(a.outcome == "ok" for a in op.attempts):
            continue
        tag = op.echo.get("tag")
        if op.kind == "import" and "ids" in op.echo and op.units and not op.echo.get("again") and tag:
            customer = op.echo["customer"]
            if (customer, tag) in erased:
                continue
            workspace_id = uuid.UUID(world.tenant(tag).workspace_id)
            row = await check.fetch(
                "SELECT email FROM customers WHERE workspace_id = $1 AND external_id = $2", workspace_id, customer
            )
            want = email_of(customer, tag)
            if not row or row[0]["email"] != want:
                got = row[0]["email"] if row else "no customer row"
                elsewhere = _elsewhere(erased, customer, tag)
                out["tenant_wall"].append(
                    f"workspace {tag}'s customer {customer} (never erased there): {got!r}, not {want!r};"
                    f" erased elsewhere: {elsewhere}"
                )
        elif op.kind == "sale" and "invoice" in op.echo and op.n < 700_000:
            out["unattributed"] += await _attributed(check, history, op)
    deleted = {ws for op in history.ops.values() if op.kind == "t-workspace" for ws in op.echo.get("deleted", [])}
    for ws, tag in world.gone.items():
        if ws not in deleted:  # its deletion never answered (a fault throughout): nothing to hold it to
            continue
        for table in sorted({t["table_name"] for t in await check.fetch_raw(SCOPED)}):  # on any shard
            sql = f"SELECT count(*) AS n FROM public.{table} WHERE workspace_id = $1"
            left = await check.fetch_raw(sql, uuid.UUID(ws))
            if n := sum(r["n"] for r in left):
                out["tenant_wall"].append(f"workspace {tag}, deleted, still has {n} row(s) in {table}")
    return out


def _elsewhere(erased: set[tuple[str, str]], customer: str, tag: str) -> list[str]:
    return sorted(t for c, t in erased if c == customer and t != tag)


async def _attributed(check: Checker, history: History, op: Op) -> list[str]:
    """A tenant sale (``t-sale``) on a lead imported 60 days back: on that lead's link."""
    lead = next(
        (
            o
            for o in history.ops.values()
            if o.kind == "import"
            and o.echo.get("customer") == op.echo["customer"]
            and o.echo.get("tag") == "b"
            and "code" in o.echo
        ),
        None,
    )
    if lead is None or not any(a.outcome == "ok" for a in lead.attempts):
        return []
    rows = await check.fetch(
        "SELECT l.code FROM sales s LEFT JOIN links l ON l.id = s.link_id WHERE s.metadata->>'gen' = $1", op.token
    )
    return [
        f"sale {op.token} of {op.echo['customer']} (lead 60 days old, lifetime): on {r['code']!r},"
        f" not {lead.echo['code']!r}"
        for r in rows
        if r["code"] != lead.echo["code"]
    ]


# the body fields that name a person (Dub's older names for the customer's id among them)
PERSONAL_KEYS = ("customerExternalId", "externalId", "customerId", "customer_id", "customerEmail", "email", "ip")


def personal(history: History) -> list[str]:
    """What a log must never hold: every customer id, email and client address the run sent."""
    values: set[str] = set()
    for op in history.ops.values():
        body = op.body
        items = body if isinstance(body, list) else [body] if isinstance(body, dict) else []
        for item in items:
            if not isinstance(item, dict):  # a CSV file's lines (careless.py): its rows hold no person
                continue
            for key in PERSONAL_KEYS:
                v = item.get(key)
                if isinstance(v, str) and len(v) >= 6:
                    values.add(v)
        if op.kind == "erase":
            values.add(op.echo["customer"])
    return sorted(values)


def scan_logs(paths: list[Path], outputs: list[str], values: list[str]) -> dict[str, list[str]]:
    """``crash`` (``_logscan.find_crashes``) and ``personal_in_log`` over every log file and
    command output: each value in every spelling a line may carry it (``_logscan.spellings``),
    as a whole word (a token is the prefix of others: g1-22 of g1-220), and not as part of a
    referrer (``https://gen.test/<token>`` names a request, not a person)."""
    out: dict[str, list[str]] = {"crash": [], "personal_in_log": []}
    forms = sorted({f for v in values for f in spellings(v)}, key=len, reverse=True)
    needles = re.compile(
        r"(?<![\w.@-])(?<!gen\.test/)(?:" + "|".join(re.escape(f) for f in forms) + r")(?![\w@-]|\.\w)",
        re.IGNORECASE,
    )
    texts = [(p.name, p.read_text(errors="replace")) for p in paths if p.exists()]
    texts += [(f"command output {i}", o) for i, o in enumerate(outputs)]
    for name, text in texts:
        out["crash"] += [f"{name}: {line[:300]}" for line in find_crashes(text)]
        if forms:
            out["personal_in_log"] += [
                f"{name}: {m.group()!r} in {line[:200]}" for line in text.splitlines() if (m := needles.search(line))
            ]
    return out
