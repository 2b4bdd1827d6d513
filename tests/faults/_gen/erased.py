"""The checker's part for erasures (``DELETE /v1/customers/{id}``, docs/privacy.md).

An erase operation names a lead's customer (its token); the schedule picks leads whose click
no other lead names and whose customer no sale names. Once the run is healed and drained,
the workers' sweep is run to its end, then:

- the rows of an erased person still answer for their requests: a lead's row carries the
  customer's pseudonym (``ingest.contract.erasure.pseudonym``), read back as its token; the
  click the lead named lost its referrer (the token's only home), and is found by its event
  id, which the click's answers named;
- ``erased_kept``: for a customer whose erasure was answered 2xx, their external id, or
  (their lead stored) their click's referrer, is still in Postgres, in a Redis key or stream
  entry, or in an archive segment;
- ``erasure_pending``: a sweep run after the drain still leaves Redis or the archive pending
  for an erasure that was answered 2xx.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from ingest.contract import erasure as ledger
from ingest.contract.erasure import EXTERNAL
from ingest.contract.events import FIELD, Envelope, EnvelopeError
from workers.archive import segment as seg
from workers.archive.store import LocalStore
from workers.ops import erasure

from .._checks import Checker
from .history import History
from .ops import REFERRER, named_events

SWEEPS = 5  # each after a drained run: the first finds nothing waiting; a few more for a worker's in flight


@dataclass
class Erased:
    """Customer tokens whose erasure was answered 2xx (``done``) or may have happened."""

    done: set[str] = field(default_factory=set)
    maybe: set[str] = field(default_factory=set)
    clicks: dict[str, str] = field(default_factory=dict)  # event id (hex) of an erased lead's click -> its token
    referrers: dict[str, str] = field(default_factory=dict)  # customer token -> their click's referrer
    aliases: dict[str, str] = field(default_factory=dict)  # pseudonym -> customer token


def erasures(history: History) -> Erased:
    out = Erased()
    for op in history.ops.values():
        if op.kind != "erase" or op.skipped is not None:
            continue
        outcomes = {a.outcome for a in op.attempts}
        customer = op.echo["customer"]
        if "ok" in outcomes:
            out.done.add(customer)
        elif outcomes & {"unknown", "error"}:
            out.maybe.add(customer)
        else:
            continue
        lead = history.ops.get(op.echo["lead"])
        click = lead.echo.get("click") if lead is not None else None
        if not isinstance(click, str):
            continue
        event = click.removeprefix("clk_")
        for other in history.ops.values():
            if other.kind in ("affitor", "redirect") and any(
                named_events(other, a).get(0) == event for a in other.attempts
            ):
                out.clicks[event] = other.token
                out.referrers[customer] = REFERRER + other.token
    return out


async def read_back(check: Checker, found: Erased, rows: list[Any]) -> list[dict[str, Any]]:
    """``rows`` (the checker's: event_id, token, ...) with an erased person's token restored."""
    if not (found.done or found.maybe):
        return [dict(r) for r in rows]
    salt = (await check.fetch("SELECT salt FROM erasure_salt"))[0]["salt"]
    spaces = [str(r["id"]) for r in await check.fetch("SELECT id FROM workspaces")]
    for customer in found.done | found.maybe:
        for ws in spaces:
            found.aliases[ledger.pseudonym(bytes(salt), EXTERNAL, customer, ws)] = customer
    out = []
    for r in rows:
        row = dict(r)
        if row["token"] in found.aliases:
            row["token"] = found.aliases[row["token"]]
        elif row["token"] is None and row["event_id"].hex in found.clicks:
            row["token"] = found.clicks[row["event_id"].hex]
        out.append(row)
    return out


async def problems(
    check: Checker, found: Erased, archive_root: Path, prefix: str, leads: set[str]
) -> dict[str, list[str]]:
    """``leads``: the customers whose lead is stored (read back): only a stored lead makes
    its click the person's (a lead never stored leaves its click nobody's in particular)."""
    out: dict[str, list[str]] = {"erased_kept": [], "erasure_pending": []}
    if not (found.done or found.maybe):
        return out
    ledger.forget_salt()  # this process checks one seed's database after another's: each has its own salt
    pool = await asyncpg.create_pool(check.database_url, min_size=1, max_size=2)
    try:
        store = LocalStore(str(archive_root))
        for _ in range(SWEEPS):
            await erasure.sweep(pool, check.redis, check.keys, store)
            left = [p for p in await erasure.status(pool) if "postgres" not in p["pending"]]
            if not left:
                break
        else:
            out["erasure_pending"] = [f"{p['erasure_id']}: {p['pending']} after {SWEEPS} sweeps" for p in left]
        # the external id as a whole JSON string (a token is the prefix of others: g1-22 of
        # g1-220), anywhere
        needles = {c: f'"{c}"'.encode() for c in found.done}
        places, entries = await _places(check, pool, store, prefix)
        for where, data in places:
            out["erased_kept"] += [f"customer {c}: their external id is still in {where}"
                                   for c, needle in needles.items() if needle in data]  # fmt: skip
        # the referrer of their click (its event, by id: a retry of the click op that got no
        # answer may have stored another click, another visitor's, with the same referrer)
        clicks = {event: c for c in found.done if c in leads
                  for event, token in found.clicks.items() if found.referrers.get(c) == REFERRER + token}  # fmt: skip
        rows = await pool.fetch("SELECT event_id, referrer FROM events WHERE event_id = ANY($1::uuid[])",
                                [uuid.UUID(hex=e) for e in clicks])  # fmt: skip
        for r in rows:
            if r["referrer"] is not None:
                out["erased_kept"].append(f"customer {clicks[r['event_id'].hex]}: their click's referrer in postgres")
        for where, e in entries:
            if e.event_id.hex in clicks and e.payload.get("referrer") is not None:
                out["erased_kept"].append(f"customer {clicks[e.event_id.hex]}: their click's referrer in {where}")
    finally:
        await pool.close()
    return out


async def _places(
    check: Checker, pool: asyncpg.Pool, store: LocalStore, prefix: str
) -> tuple[list[tuple[str, bytes]], list[tuple[str, Envelope]]]:
    """Every place's bytes (Postgres's rows as JSON text, every Redis key of the run's
    prefix, every archive segment's entries), and every stream entry's and archived line's
    envelope."""
    places, entries = [], []
    for table in ("customers", "events", "event_dedupe", "sales", "commissions", "webhook_deliveries", "event_flags"):
        rows = await pool.fetch(f"SELECT row_to_json(t)::text AS j FROM {table} t")
        places.append((f"postgres {table}", "\n".join(r["j"] for r in rows).encode()))
    redis = check.redis
    async for name in redis.scan_iter(match=f"{check.keys.prefix}*", count=1000):
        kind = (await redis.type(name)).decode()
        if kind == "string":
            held = [await redis.get(name) or b""]
        elif kind == "stream":
            found = await redis.xrange(name)
            held = [v for _, fields in found for kv in (fields or {}).items() for v in kv]
            entries += [(f"redis {name.decode()}", e) for _, fields in found if (e := _envelope(fields))]
        else:
            continue  # hashes (drop tallies), sets and zsets (rate limits, presence): no event data
        places.append((f"redis {name.decode()}", b"\x00".join(h for h in held if isinstance(h, bytes))))
    for key in await store.list(prefix + "/"):
        _, lines = seg.read(await store.get(key))
        held = [e.envelope or b"" for e in lines] + [v for e in lines for v in (e.fields or {}).values()]
        places.append((f"archive {key}", b"\x00".join(held)))
        for line in lines:
            if e := _envelope(line.fields if line.fields is not None else {FIELD: line.envelope or b""}):
                entries.append((f"archive {key}", e))
    return places, entries


def _envelope(fields: dict[bytes, bytes] | None) -> Envelope | None:
    try:
        return Envelope.from_entry(fields or {})
    except EnvelopeError:
        return None
