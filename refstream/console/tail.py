"""The newest events: as the edge accepted them (the streams, newest first, by XREVRANGE)
and as the workers stored or dropped them (Postgres), with the drop reason.

Read-only by construction: XREVRANGE is a plain read, never XREADGROUP, so the tail joins
no consumer group, holds no entry and takes no work from the workers. Each answer is
bounded, so a page polling every second costs the same however busy the pipeline is and
however long its table: at most ``SCAN`` entries read per partition in Redis, and in
Postgres the newest ``SCAN_ROWS`` rows of the last ``LOOKBACK_S`` by event id (the
primary key read backward, older partitions pruned), or with a workspace or a link in the
filter, that one's newest rows by its own index, the rest of the filter applied to those
(``bench --only con`` measures what ten open consoles cost the edge and the worker).

Two kinds of refusal have no event row: the codes the edge refused as unknown (the newest
``SHOWN`` of the stream the edges keep of them, ``ingest.contract.drops.refused_key``), and
the worker's drops of a code no link has (``event_drops`` keeps no code: it is read back
from the stream entry, for the newest ``CODES_LOOKED_UP`` of them, while Redis holds it).
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import orjson

from ingest.contract import clock, drops, layout, link_keys, wire
from ingest.contract.connections import Redis
from ingest.contract.errors import Refused
from ingest.contract.events import Envelope, EventType
from ingest.contract.keys import Keys
from ingest.ledger.placement import Placement
from ingest.privacy.erasure import uuid_floor

SHOWN = 50
SCAN = 200  # newest entries read per partition, before the filter
WINDOW_S = 300  # drops of the last five minutes
PAYLOAD_CHARS = 2000

CODES_LOOKED_UP = 10  # unknown codes' drops whose entry is looked for, per read
ENTRY_AFTER_MS = (-2_000, 10_000)  # where its entry is looked for, around its received time

LOOKBACK_S = 86_400  # stored events accepted within a day: the partitions a tail reads
SCAN_ROWS = 5_000  # newest rows read before a dialect or type filter


def _stored(flt: Filter, floor: uuid.UUID, link_id: uuid.UUID | None = None) -> tuple[str, list[Any]]:
    """The statement and its arguments for the newest stored rows matching ``flt`` (with a
    link in it, ``link_id`` is that link's id). Only the filters given are in it, so each
    shape plans with the index that serves it (a workspace's by event id, a link's by
    received time, schema 19; else the primary key), each read in order and stopped at its
    bound, never a sort of the whole lookback."""
    args: list[Any] = [floor]
    inner = ["e.event_id >= $1"]
    if flt.workspace is not None:
        args.append(flt.workspace)
        inner.append(f"e.workspace_id = ${len(args)}::uuid")
    if flt.link is not None:
        args.append(link_id)
        inner.append(link_keys.of_link("e.link_id", f"${len(args)}"))
    # a moved-away workspace's old copy (``workspaces.moved_to``): shown where it is now
    outer = ["NOT EXISTS (SELECT 1 FROM workspaces w WHERE w.id = e.workspace_id AND w.moved_to IS NOT NULL)"]
    if flt.dialect is not None:
        args.append(flt.dialect)
        outer.append(f"e.dialect = ${len(args)}::text")
    if flt.type is not None:
        args.append(flt.type)
        outer.append(f"e.type = ${len(args)}::smallint")
    args += [SCAN_ROWS, SHOWN]
    order = "e.received_at DESC, e.event_id DESC" if flt.link is not None else "e.event_id DESC"
    sql = f"""
SELECT e.event_id, e.type, e.workspace_id, l.code, e.dialect, e.received_at, e.processed_at,
       e.is_bot, e.test_mode, e.out_of_window,
       event_payload(e.payload, e.link_id, e.referrer, e.click_id, e.visitor_id) AS payload
FROM (SELECT * FROM events e WHERE {" AND ".join(inner)} ORDER BY {order} LIMIT ${len(args) - 1}) e
LEFT JOIN links l ON l.id = e.link_id
WHERE {" AND ".join(outer)}
ORDER BY e.event_id DESC LIMIT ${len(args)}
"""
    return sql, args


# the worker's drops that leave no event row (event_drops): no dialect or type is kept there
_DROPPED = """
SELECT d.event_id, d.workspace_id, l.code, d.reason, d.received_at
FROM event_drops d LEFT JOIN links l ON l.id = d.link_id
WHERE d.received_at > now() - make_interval(secs => $1)
  AND ($2::uuid IS NULL OR d.workspace_id = $2) AND ($3::text IS NULL OR l.code = $3)
  AND NOT EXISTS (SELECT 1 FROM workspaces w WHERE w.id = d.workspace_id AND w.moved_to IS NOT NULL)
ORDER BY d.received_at DESC LIMIT $4
"""


class BadFilter(Refused, ValueError):
    """A filter no event could match the form of: the page's 400."""


@dataclass(frozen=True, slots=True)
class Filter:
    """Events matching every given field (None: any)."""

    workspace: str | None = None
    link: str | None = None  # the link's code
    dialect: str | None = None
    type: int | None = None

    @classmethod
    def parse(cls, query: Any) -> Filter:
        def given(name: str) -> str | None:
            v = query.get(name, "").strip()
            return v[:256] or None

        ws, kind = given("workspace"), given("type")
        try:
            workspace = str(uuid.UUID(ws)) if ws else None
        except ValueError:
            raise BadFilter("workspace: a workspace id (a UUID)") from None
        if kind is not None and kind.upper() not in EventType.__members__:
            raise BadFilter(f"type: one of {', '.join(t.name.lower() for t in EventType)}")
        number = int(EventType[kind.upper()]) if kind else None
        return cls(workspace, given("link"), given("dialect"), number)

    def matches(self, e: Envelope) -> bool:
        return (
            (self.workspace is None or e.workspace_id == self.workspace)
            and (self.link is None or e.payload.get("code") == self.link)
            and (self.dialect is None or e.dialect == self.dialect)
            and (self.type is None or int(e.type) == self.type)
        )


def _payload(p: Any) -> str:
    text = orjson.dumps(p).decode()
    return text if len(text) <= PAYLOAD_CHARS else text[:PAYLOAD_CHARS] + "…"


def _row(e: Envelope, stage: str, at_ms: int) -> dict[str, Any]:
    code = e.payload.get("code")
    return {
        "event_id": e.event_id.hex,
        "stage": stage,
        "at_ms": at_ms,
        "type": e.type.name.lower(),
        "dialect": e.dialect,
        "workspace": e.workspace_id,
        "link": code if isinstance(code, str) else None,
        "payload": _payload(e.payload),
    }


async def accepted(redis: Redis, keys: Keys, flt: Filter) -> list[dict[str, Any]]:
    """The newest accepted events matching ``flt``, newest first (by their stream id)."""
    found: list[tuple[bytes, dict[str, Any]]] = []
    high = (await layout.load(redis, keys, keys.partitions)).high
    for p in range(high):
        for entry_id, fields in await redis.xrevrange(keys.stream(p), count=SCAN):
            try:
                e = wire.from_entry(fields or {})
            except wire.EnvelopeError:
                continue  # the dead letters page shows what does not decode
            if flt.matches(e):
                ms = int(entry_id.split(b"-")[0])
                found.append((entry_id, _row(e, "accepted", ms)))
    found.sort(key=lambda f: tuple(int(x) for x in f[0].split(b"-")), reverse=True)
    return [row for _, row in found[:SHOWN]]


def _ms(at: Any) -> int:
    return int(at.timestamp() * 1000)


async def refused(redis: Redis, keys: Keys, flt: Filter) -> list[dict[str, Any]]:
    """The newest codes the edges refused as unknown (no workspace, no event: only a link
    filter, by the code, keeps them)."""
    if flt.workspace is not None or flt.dialect is not None or flt.type is not None:
        return []
    rows = []
    for _, fields in await redis.xrevrange(drops.refused_key(keys.prefix), count=SHOWN):
        code = (fields.get(b"code") or b"").decode(errors="replace")
        if flt.link is not None and code != flt.link:
            continue
        route = (fields.get(b"route") or b"").decode(errors="replace")
        rows.append(
            {
                "event_id": None,
                "stage": "refused",
                "reason": "unknown_code",
                "at_ms": int(fields.get(b"at") or 0),
                "type": None,
                "dialect": None,
                "workspace": None,
                "link": code,
                "payload": f"refused by the edge ({route}): no link has this code",
            }
        )
    return rows


async def _entry_code(redis: Redis, keys: Keys, event_id: str, at_ms: int, high: int) -> str | None:
    """The code of event ``event_id``'s stream entry, looked for in every partition around
    ``at_ms``, its received time; None when Redis holds it no more."""
    lo, hi = (at_ms + d for d in ENTRY_AFTER_MS)
    pages = await asyncio.gather(*(redis.xrange(keys.stream(p), min=lo, max=hi, count=SCAN) for p in range(high)))
    for page in pages:
        for _, fields in page:
            try:
                e = wire.from_entry(fields or {})
            except wire.EnvelopeError:
                continue
            if e.event_id.hex == event_id:
                code = e.payload.get("code")
                return code if isinstance(code, str) else None
    return None


async def _codes(redis: Redis, keys: Keys, rows: list[dict[str, Any]]) -> None:
    """The code on the newest unknown codes' drops, read from their stream entries."""
    unknown = [r for r in rows if r["reason"] == "unknown_code" and r["link"] is None][:CODES_LOOKED_UP]
    if not unknown:
        return
    high = (await layout.load(redis, keys, keys.partitions)).high
    found = await asyncio.gather(*(_entry_code(redis, keys, r["event_id"], r["at_ms"], high) for r in unknown))
    for row, code in zip(unknown, found, strict=True):
        row["link"] = code


async def outcomes(pg: asyncpg.Pool | Placement, flt: Filter, redis: Redis, keys: Keys) -> list[dict[str, Any]]:
    """The newest events stored (a bot's, a test-mode one and one out of its window are
    stored but count nothing: their reason), newest accepted first, those of the last
    ``WINDOW_S`` dropped with no row (event_drops), and the codes the edge refused. With
    several shards, a workspace's filter reads its shard, else every shard's rows are read."""
    if not isinstance(pg, Placement):
        pools = [pg]
    elif flt.workspace is not None:
        pools = [await pg.pool(flt.workspace)]
    else:
        pools = list((await pg.pools()).values())
    rows: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    for pool in pools:
        stored, gone = await _read(pool, flt)
        rows += stored
        dropped += gone
    if dropped:
        dropped.sort(key=lambda row: row["at_ms"], reverse=True)
        dropped = dropped[:SHOWN]
        await _codes(redis, keys, dropped)
    rows += dropped
    rows += await refused(redis, keys, flt)
    rows.sort(key=lambda row: row["at_ms"], reverse=True)
    return rows[:SHOWN]


async def _read(pg: asyncpg.Pool, flt: Filter) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One shard's newest stored rows and its drops of the window."""
    rows = []
    link_id = None if flt.link is None else await pg.fetchval("SELECT id FROM links WHERE code = $1", flt.link)
    stored = []
    if flt.link is None or link_id is not None:  # a code no link has: nothing stored under it
        sql, args = _stored(flt, uuid_floor(clock.utcnow() - timedelta(seconds=LOOKBACK_S)), link_id)
        stored = await pg.fetch(sql, *args)
    for r in stored:
        reason = next((why for why in ("is_bot", "test_mode", "out_of_window") if r[why]), None)
        rows.append(
            {
                "event_id": r["event_id"].hex,
                "stage": "stored" if reason is None else "dropped",
                "reason": {"is_bot": "bot"}.get(reason or "", reason),
                "at_ms": _ms(r["processed_at"]),
                "type": EventType(r["type"]).name.lower(),
                "dialect": r["dialect"],
                "workspace": str(r["workspace_id"]),
                "link": r["code"],
                "payload": _payload(r["payload"]),
            }
        )
    dropped = []
    if flt.dialect is None and flt.type is None:
        for r in await pg.fetch(_DROPPED, float(WINDOW_S), flt.workspace, flt.link, SHOWN):
            dropped.append(
                {
                    "event_id": r["event_id"].hex,
                    "stage": "dropped",
                    "reason": r["reason"],
                    "at_ms": _ms(r["received_at"]),
                    "type": None,
                    "dialect": None,
                    "workspace": str(r["workspace_id"]),
                    "link": r["code"],
                    "payload": None,
                }
            )
    return rows, dropped
