"""The click_burst rule's count: one address's recent clicks on one link, read from a
window kept per (link, address), not from an index of every click.

``burst_windows`` holds, per link and address, the newest ``keep`` clicks stored (their
received time and event id, in one byte string: schema 21), ``keep`` being the link's
program's ``burst_clicks`` + 1: a count stops there, since whether a click crossed the
line is all the rule decides. A pass (``workers.consumer.burst_pass``) reads the windows
of its clicks' (link, address) pairs and merges its clicks into them in one statement, in
its transaction, after the clicks' batches committed (a workspace that excludes the rule:
in the batch's transaction, before its events are inserted, since there the flag decides
what counts: ``workers.consumer.fraud``), each row locked in (link, address) order, before
the flags (``workers.consumer.store``'s lock order). A window holds only clicks that are
stored: a pass's own commit or roll back with it, and a click merged before is the same
entry (by event id), counted once. Per click that is no index entry and no range scan: a
statement writes one row per pair it holds, whatever its number of clicks, and a pair's
row is one version of a few hundred bytes that the next statement replaces (a HOT update:
no index column changes).

A click's count is every click of its window read (as the statement's snapshot showed it)
and of its statement, in (received time, event id) order up to it, within ``burst_seconds``
before it. What a window no longer holds (more than ``keep`` newer clicks came, or a
concurrent pass had not committed) is not counted: a count may fall short, never exceed
the clicks stored in the window, so a flag is always earned (the generative checker's
``burst_unearned``). Counted are the clicks with an address (a bot's too, as the rule
always counted them; test mode, and the clicks an import stores, never).

A row past its ``until`` (its newest click + the window) counts nothing more: ``prune``
deletes those, on the consumer's timer, skipping a row a batch holds. An erasure deletes
its person's pairs (``ingest.privacy.erasure``), a workspace's deletion its links'.
Schema 18's ``click_windows`` (the same, as two arrays) is pruned too while a worker of
schemas 18 to 20 may still write it.
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from dataclasses import dataclass
from typing import Final
from uuid import UUID

import asyncpg

from ingest.contract import jsonrows
from ingest.contract.fraud import BURST_WINDOW_TABLES

_TOP: Final = b"\xff" * 17  # past every event id's 16 bytes

# A window's entry: a click's received time in ms (8 bytes, big-endian) and its event id
# (16), so that the bytes sort as (time, id) do; a window's entries are oldest first
_ENTRY: Final = 24
_UNPACK: Final = struct.Struct(">Q16s").iter_unpack
_NEWEST_AT = f"substr(w.clicks, length(w.clicks) - {_ENTRY - 1}, 8)"  # the window's newest click's time
# `before`: the windows as the statement's snapshot shows them. Where a window's clicks
# all come before every click of the batch (clicks arrive in time order) and within the
# window of each (a burst), its size alone is read (`n`); else its entries (`clicks`), of
# which the times alone count where they all come before the batch's (`ids`: false). The
# insert then merges the batch's clicks into each, waiting for a concurrent batch's lock
# on a row if it must, in key order: where they all come after the window's newest, the
# window's tail and the batch's make it (two byte strings joined and cut); else the newest
# `keep` of both, in (time, id) order, each entry once (a redelivered click). The batch's
# entries come as hex, its times as numbers made bytes by `int8send`
_IN_ORDER = f"substr(w.clicks, length(w.clicks) - {_ENTRY - 1}) < substr(EXCLUDED.clicks, 1, {_ENTRY})"
_TAIL = f"""substr(w.clicks || EXCLUDED.clicks,
                              greatest(1, length(w.clicks) + length(EXCLUDED.clicks) - EXCLUDED.keep * {_ENTRY} + 1))"""
_NEWEST = f"""(SELECT string_agg(e, ''::bytea ORDER BY e) FROM (
                     SELECT DISTINCT substr(x.b, i * {_ENTRY} + 1, {_ENTRY}) AS e
                     FROM (SELECT w.clicks || EXCLUDED.clicks AS b) x, generate_series(0, length(x.b) / {_ENTRY} - 1) i
                     ORDER BY 1 DESC LIMIT EXCLUDED.keep) newest)"""
_MERGE = f"""
WITH d (k, link_id, ip, keep, since, reach, clicks, until) AS MATERIALIZED (
    SELECT (r->>0)::int, (r->>1)::uuid, (r->>2)::inet, (r->>3)::int, int8send((r->>4)::bigint),
           int8send((r->>5)::bigint), decode(r->>6, 'hex'), to_timestamp((r->>7)::bigint / 1000.0)
    FROM jsonb_array_elements($1::text::jsonb) AS r
),
before AS (
    SELECT d.k, length(w.clicks) / {_ENTRY} AS n,
           CASE WHEN {_NEWEST_AT} >= d.since OR substr(w.clicks, 1, 8) <= d.reach THEN w.clicks END AS clicks,
           {_NEWEST_AT} >= d.since AS ids
    FROM d JOIN burst_windows w ON w.link_id = d.link_id AND w.ip = d.ip
),
merged AS (
    INSERT INTO burst_windows AS w (link_id, ip, keep, until, clicks)
    SELECT link_id, ip, keep, until, clicks FROM d ORDER BY link_id, ip
    ON CONFLICT (link_id, ip) DO UPDATE SET
        keep = EXCLUDED.keep,
        until = greatest(w.until, EXCLUDED.until),
        clicks = CASE WHEN {_IN_ORDER} THEN {_TAIL} ELSE {_NEWEST} END
    RETURNING 1
)
SELECT k, n, clicks, ids FROM before
"""

# rows past their window, a chunk at a time; a row a batch holds is skipped (next time).
# Also schema 18's table, which a worker of schemas 18 to 20 may still write
_PRUNE = """
DELETE FROM {table} WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM {table} WHERE until < now() LIMIT $1 FOR UPDATE SKIP LOCKED))
"""
PRUNE_CHUNK = 10_000


def entry(at_ms: int, event_id: bytes) -> bytes:
    """A click's entry in a window: its time and id (its 16 bytes), as ``burst_windows.clicks``
    holds them."""
    return at_ms.to_bytes(8, "big") + event_id


def entries(clicks: bytes) -> list[tuple[int, bytes]]:
    """A window's ``clicks``: (time in ms, event id's 16 bytes), oldest first: tuples that
    sort as the entries' bytes do (big-endian bytes compare as their numbers). Unpacked in
    C: a window of 11 in 0.6 µs, where slicing and ``int.from_bytes`` took 2.9."""
    return list(_UNPACK(clicks))


@dataclass(frozen=True, slots=True)
class Limits:
    clicks: int  # burst_clicks: a click is flagged when its window holds more
    seconds: int  # burst_seconds


@dataclass(frozen=True, slots=True)
class Click:
    """A stored click with an address, as its window counts it."""

    event_id: UUID
    link_id: str
    ip: str  # as stored (the workspace's ip_policy applied)
    at_ms: int  # its received time
    judged: bool  # the rule judges it; a bot's click joins its window and is never flagged


@dataclass(frozen=True, slots=True)
class Counted:
    click: Click
    clicks: int  # its window's clicks up to it, itself included, stopped at ``limits.clicks`` + 1
    limits: Limits


async def count(conn: asyncpg.Connection, clicks: list[Click], limits_of: dict[str, Limits]) -> list[Counted]:
    """Merge ``clicks`` (stored, or about to be in the caller's transaction) into their
    windows; the count of each one the rule judges. ``limits_of``: per link id, its
    program's thresholds."""
    if not clicks:
        return []
    pairs: dict[tuple[str, str], list[tuple[int, bytes]]] = {}  # (time, id's bytes): compared in C
    for c in clicks:
        pairs.setdefault((c.link_id, c.ip), []).append((c.at_ms, c.event_id.bytes))
    keys = sorted(pairs)
    rows = []
    for k, (link_id, ip) in enumerate(keys):
        lim = limits_of[link_id]
        mine = pairs[(link_id, ip)]
        mine.sort()
        newest = mine[-(lim.clicks + 1) :]
        last = mine[-1][0]
        rows.append(
            (
                k,
                link_id,
                ip,
                lim.clicks + 1,
                mine[0][0],  # since: the batch's oldest
                max(0, last - lim.seconds * 1000),  # reach: a window's click after it is in every one's window
                b"".join(entry(a, i) for a, i in newest).hex(),
                last + lim.seconds * 1000,  # until
            )
        )
    # per pair: how many of the window's clicks come before, and within the window of,
    # every click of the batch; or their times, in order, where they come before but not
    # all within; or else the window's entries with the batch's, in (time, id's bytes)
    # order, each once (a redelivered click the window holds already)
    before_all: dict[tuple[str, str], int] = {}
    earlier: dict[tuple[str, str], list[int]] = {}
    held = pairs  # sorted above
    for r in await conn.fetch(_MERGE, jsonrows.doc(rows)):
        key = keys[r["k"]]
        if r["clicks"] is None:
            before_all[key] = r["n"]
        elif not r["ids"]:
            earlier[key] = [a for a, _ in entries(r["clicks"])]
        else:
            held[key] = sorted(set(held[key]).union(entries(r["clicks"])))
    out = []
    for c in clicks:
        if not c.judged:
            continue
        key = (c.link_id, c.ip)
        lim = limits_of[c.link_id]
        since = c.at_ms - lim.seconds * 1000  # the window: after this
        window = held[key]
        n = bisect_right(window, (c.at_ms, c.event_id.bytes)) - bisect_right(window, (since, _TOP))
        n += before_all.get(key, 0)
        if (before := earlier.get(key)) is not None:
            n += len(before) - bisect_right(before, since)
        out.append(Counted(c, min(n, lim.clicks + 1), lim))
    return out


async def prune(conn: asyncpg.Connection) -> int:
    """Delete the windows past their time; how many."""
    total = 0
    for table in BURST_WINDOW_TABLES:
        while True:
            n = int((await conn.execute(_PRUNE.format(table=table), PRUNE_CHUNK)).split()[-1])
            total += n
            if n < PRUNE_CHUNK:
                break
    return total
