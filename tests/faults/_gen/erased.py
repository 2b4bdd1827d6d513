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
from typing import Any, cast

import asyncpg

from ingest.contract import erasure as ledger
from ingest.contract import erasure_index, wire
from ingest.contract.erasure import EXTERNAL
from ingest.contract.events import Envelope
from ingest.contract.keys import Keys, parse_id
from ingest.contract.wire import FIELD, EnvelopeError
from workers.archive import segment as seg
from workers.archive.store import LocalStore
from workers.ops import erasure

from .._checks import Checker
from .history import History
from .ops import named_events, referrer
from .tenants import suffix

SWEEPS = 5  # each after a drained run: the first finds nothing waiting; a few more for a worker's in flight


@dataclass
class Erased:
    """Customer tokens (a customer's id, with ``@b`` for another workspace's: ``tenants.py``)
    whose erasure was answered 2xx (``done``) or may have happened (``maybe``)."""

    done: set[str] = field(default_factory=set)
    maybe: set[str] = field(default_factory=set)
    person: dict[str, tuple[str, str]] = field(default_factory=dict)  # token -> (external id, workspace tag)
    clicks: dict[str, str] = field(default_factory=dict)  # event id (hex) of an erased lead's click -> its token
    referrers: dict[str, str] = field(default_factory=dict)  # customer token -> their click's referrer
    aliases: dict[tuple[str, str], str] = field(default_factory=dict)  # (pseudonym, workspace tag) -> token
    tokens: dict[str, str] = field(default_factory=dict)  # event id (hex) -> its request's token, whatever it holds
    # customer token -> the token of their sale no answer named (every attempt a 503 "may be
    # stored" for a repeat of its key: no event id); its row is found by the customer instead
    unnamed_sales: dict[str, str] = field(default_factory=dict)


def erasures(history: History) -> Erased:
    out = Erased()
    for op in history.ops.values():
        if op.echo.get("again") and op.skipped is None:  # a lead of an erased person, imported again
            out.tokens[op.echo["ids"][0]] = op.units[0].token
        if op.kind != "erase" or op.skipped is not None:
            continue
        outcomes = {a.outcome for a in op.attempts}
        tag = op.echo.get("tag", "a")
        customer = op.echo["customer"] + suffix(tag)
        out.person[customer] = (op.echo["customer"], tag)
        if "ok" in outcomes:
            out.done.add(customer)
        elif outcomes & {"unknown", "error"}:
            out.maybe.add(customer)
        else:
            continue
        lead = history.ops.get(op.echo["lead"])
        if op.echo.get("shared"):  # a browser two customers share: its click, the other's too, is found
            click_op = history.ops.get(lead.echo["click_op"]) if lead is not None else None  # by its id
            if click_op is not None:  # (scrubbed or not: the order of their leads and the erasure says)
                for a in click_op.attempts:
                    if (event := named_events(click_op, a).get(0)) is not None:
                        out.tokens[event] = click_op.token
            continue
        if lead is not None and lead.kind == "sale":  # a customer of a sale (``careless.py``): its metadata, the
            named = False  # token's home, is scrubbed with them; its event id, answered, finds it
            for a in lead.attempts:
                if (event := named_events(lead, a).get(0)) is not None:
                    out.tokens[event] = lead.token
                    named = True
            if not named:  # no answer named it: its customer's pseudonym, in their workspace, does
                out.unnamed_sales[customer] = lead.token
            continue
        if lead is not None and lead.kind == "import":  # the person's lead and click, imported: their click's
            if lead.units and lead.units[0].kind == "click":  # referrer goes, its event id (derived) finds it
                out.tokens[lead.echo["ids"][0]] = lead.units[0].token
            continue
        click = lead.echo.get("click") if lead is not None else None
        if not isinstance(click, str):
            continue
        event = click.removeprefix("clk_")
        for other in history.ops.values():
            if other.kind in ("affitor", "redirect") and any(
                named_events(other, a).get(0) == event for a in other.attempts
            ):
                out.clicks[event] = other.token
                out.referrers[customer] = referrer(other.token)
    return out


async def read_back(check: Checker, found: Erased, rows: list[Any], spaces: dict[str, str]) -> list[dict[str, Any]]:
    """``rows`` (the checker's: event_id, token, workspace_id, ...) with each token its
    request's: an erased person's restored (their pseudonym in their own workspace only), and
    another workspace's with its tag (``spaces``: workspace id -> tag; ``tenants.suffix``)."""
    if found.done or found.maybe:
        salt = bytes((await check.fetch("SELECT salt FROM erasure_salt"))[0]["salt"])
        ids = {tag: ws for ws, tag in spaces.items()}
        for token in found.done | found.maybe:
            external, tag = found.person[token]
            if tag in ids:
                found.aliases[(ledger.pseudonym(salt, EXTERNAL, external, ids[tag]), tag)] = token
    out = []
    for r in rows:
        row = dict(r)
        tag = spaces.get(str(row["workspace_id"]), "?")
        event = row["event_id"].hex
        if event in found.tokens:
            row["token"] = found.tokens[event]
        elif (row["token"], tag) in found.aliases:
            row["token"] = found.aliases[(row["token"], tag)]
        elif row["token"] is None and event in found.clicks:
            row["token"] = found.clicks[event]
        elif row["token"] is None and row.get("customer") and (row["customer"], tag) in found.aliases:
            customer = found.aliases[(row["customer"], tag)]  # an erased customer's sale no answer named
            row["token"] = found.unnamed_sales.get(customer)
        elif row["token"] is not None:
            row["token"] += suffix(tag)
        out.append(row)
    return out


async def problems(
    check: Checker, found: Erased, archive_root: Path, prefix: str, leads: set[str], spaces: dict[str, str]
) -> dict[str, list[str]]:
    """``leads``: the customers whose lead is stored (read back): only a stored lead makes
    its click the person's (a lead never stored leaves its click nobody's in particular).
    ``spaces``: workspace id -> tag. A person is looked for in their own workspace's rows and
    entries, and in whatever belongs to no workspace: another workspace's customer of the
    same id is theirs to keep (``walls.py`` judges that they kept it)."""
    out: dict[str, list[str]] = {"erased_kept": [], "erasure_pending": []}
    if not (found.done or found.maybe):
        return out
    ledger.forget_salt()  # this process checks one seed's database after another's: each has its own salt
    # the sweep as the workers run it, on each shard's own pool (``placement.each``); what is
    # pending, and where a person still is, read as the checker reads (``shards.py``)
    pools = [await asyncpg.create_pool(url, min_size=1, max_size=2) for url in check.shard_urls().values()]
    try:
        store = LocalStore(str(archive_root))
        for _ in range(SWEEPS):
            for pool in pools:
                await erasure.sweep(pool, check.redis, check.keys, store)
            left = [p for p in await erasure.status(cast(asyncpg.Pool, check)) if "postgres" not in p["pending"]]
            if not left:
                break
        else:
            out["erasure_pending"] = [f"{p['erasure_id']}: {p['pending']} after {SWEEPS} sweeps" for p in left]
        # the external id as a whole JSON string (a token is the prefix of others: g1-22 of
        # g1-220), anywhere in the person's workspace or in no workspace's
        places, entries, entries_at = await _places(check, store, prefix)
        tags = {tag: ws for ws, tag in spaces.items()}
        for c in found.done:
            external, tag = found.person[c]
            needle = f'"{external}"'.encode()
            mine = (None, tags.get(tag))
            for where, ws, data in places:
                if ws in mine and needle in data:
                    about = await _entry_detail(check, *entries_at[where]) if where in entries_at else ""
                    out["erased_kept"].append(f"customer {c}: their external id is still in {where}{about}")
        # the referrer of their click (its event, by id: a retry of the click op that got no
        # answer may have stored another click, another visitor's, with the same referrer)
        clicks = {
            event: c
            for c in found.done
            if c in leads
            for event, token in found.clicks.items()
            if found.referrers.get(c) == referrer(token)
        }
        rows = await check.fetch(
            "SELECT event_id, referrer FROM events WHERE event_id = ANY($1::uuid[])", [uuid.UUID(hex=e) for e in clicks]
        )
        for r in rows:
            if r["referrer"] is not None:
                out["erased_kept"].append(f"customer {clicks[r['event_id'].hex]}: their click's referrer in postgres")
        for where, e in entries:
            if e.event_id.hex in clicks and e.payload.get("referrer") is not None:
                about = await _entry_detail(check, *entries_at[where]) if where in entries_at else ""
                who = clicks[e.event_id.hex]
                out["erased_kept"].append(f"customer {who}: their click's referrer in {where}{about}")
    finally:
        for pool in pools:
            await pool.close()
    return out


# the tables that may hold a person's data; those with a workspace_id column are read per workspace
TABLES = (
    "customers",
    "customer_leads",
    "events",
    "event_dedupe",
    "sales",
    "commissions",
    "webhook_deliveries",
    "event_flags",
)


async def _entry_detail(check: Checker, stream: str, sid: bytes, e: Envelope) -> str:
    """What tells why the sweep left a stream entry: its event, how long after its event's
    time it was appended (the sweep looks near that time), whether the workers filed it
    under a digest (``Keys.entries_of``), whether a row holds its event, and how far each
    group has read."""
    redis, at = check.redis, parse_id(sid)[0]
    late = at - erasure_index.event_ms(e.event_id)
    p = stream.rsplit("{", 1)[-1].rstrip("}")
    member = f"{p}:{sid.decode()}".encode()
    filed = [
        k.decode().rsplit(":", 2)[-2][:8]
        async for k in redis.scan_iter(match=f"{check.keys.prefix}:erasure:entries:*", count=1000)
        if member in await redis.smembers(k)
    ]
    rows = await check.fetch("SELECT workspace_id FROM events WHERE event_id = $1", e.event_id)
    groups = [
        f"{_text(g['name'])} read {_text(g['last-delivered-id'])} pending {g['pending']}"
        for g in await redis.xinfo_groups(stream)
    ]
    return (
        f" (entry {sid.decode()}: {e.type.name.lower()} {e.event_id.hex}, appended {late:+d} ms from its id,"
        f" filed {'under ' + ','.join(filed) if filed else 'nowhere'}, {len(rows)} row(s), {'; '.join(groups)})"
    )


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


async def _places(
    check: Checker, store: LocalStore, prefix: str
) -> tuple[list[tuple[str, str | None, bytes]], list[tuple[str, Envelope]], dict[str, tuple[str, bytes, Envelope]]]:
    """Every place's bytes with the workspace it belongs to (None: no one's, or not known):
    Postgres's rows as JSON text, per workspace where the table has one; every Redis key of
    the run's prefix (a stream entry and an archived line: its envelope's workspace, or its
    link's); every stream entry's and archived line's envelope; and each stream entry's place
    (its stream, id and envelope), for ``_entry_detail``."""
    places: list[tuple[str, str | None, bytes]] = []
    entries: list[tuple[str, Envelope]] = []
    entries_at: dict[str, tuple[str, bytes, Envelope]] = {}
    for table in TABLES:
        scoped = await check.fetchval(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns"
            " WHERE table_name = $1 AND column_name = 'workspace_id')",
            table,
        )
        ws = "workspace_id::text" if scoped else "NULL::text"
        rows = await check.fetch(
            f"SELECT {ws} AS ws, string_agg(row_to_json(t)::text, E'\\n') AS j FROM {table} t GROUP BY 1"
        )
        places += [(f"postgres {table}", r["ws"], (r["j"] or "").encode()) for r in rows]
    link_ws = {r["code"]: str(r["workspace_id"]) for r in await check.fetch("SELECT code, workspace_id FROM links")}

    def owner(e: Envelope | None) -> str | None:
        if e is None:
            return None
        code = e.payload.get("code") or e.payload.get("ref") or e.payload.get("link")
        return e.workspace_id or (link_ws.get(code) if isinstance(code, str) else None)

    redis = check.redis
    async for name in redis.scan_iter(match=f"{check.keys.prefix}*", count=1000):
        kind = (await redis.type(name)).decode()
        where = f"redis {name.decode()}"
        if kind == "string":  # an idempotency record names its workspace (Keys.idempotent); other strings none
            text = name.decode()
            own = Keys.record_workspace(text) if ":idk:" in text else None
            places.append((where, own, await redis.get(name) or b""))
        elif kind == "stream":
            for sid, fields in await redis.xrange(name):
                e = _envelope(fields)
                held = [v for kv in (fields or {}).items() for v in kv if isinstance(v, bytes)]
                at = f"{where} {sid.decode()}"
                places.append((at, owner(e), b"\x00".join(held)))
                if e is not None:
                    entries.append((at, e))
                    entries_at[at] = (name.decode(), sid, e)
        # hashes (drop tallies), sets and zsets (rate limits, presence): no event data
    for key in await store.list(prefix + "/"):
        _, lines = seg.read(await store.get(key))
        for line in lines:
            e = _envelope(line.fields if line.fields is not None else {FIELD: line.envelope or b""})
            held = [line.envelope or b"", *(line.fields or {}).values()]
            places.append((f"archive {key}", owner(e), b"\x00".join(held)))
            if e is not None:
                entries.append((f"archive {key}", e))
    return places, entries, entries_at


def _envelope(fields: dict[bytes, bytes] | None) -> Envelope | None:
    try:
        return wire.from_entry(fields or {})
    except EnvelopeError:
        return None
