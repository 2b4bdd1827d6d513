"""The enrichment's dictionaries (schema.sql): what repeats across clicks, stored once and
named by each enriched row instead of written into every row's ``enrichment``.

- ``event_devices`` (version 16), named by ``device_id``: what a User-Agent says of the
  browser, and the versions of the data and parsers that said it.
- ``event_places`` (version 17), named by ``place_id``: what the geo data says of an
  address's network beside its country and AS number (AS name, city, region,
  coordinates); none where it says nothing more.

A batch's entries are made before its transaction, in a statement of their own that
commits at once (``store._write_retried``): a new browser build or network is written once,
by whichever batch meets it first, and no batch holds a lock on it while it stores its
events. An entry made for a batch that then rolls back is named by no row; it is no one's
data (the geo data's and the parsers', not a visitor's: an erasure scrubs the row's names
of them, never the dictionary) and the next batch that meets it names it. Entries are
never deleted, so an id once read stays right: each dictionary is bounded by what the data
can say (browser builds seen times the worker builds that parsed them; the geo data's
networks), not by the traffic.

So each pool connection remembers the ids its server gave (``PgConnection.kept``, up to
``KEPT_MAX`` of each dictionary, cleared when full), and a batch whose devices and places
are all remembered sends no statement for them: at (cap)'s full load that was two round
trips of every transaction. Only what is committed is remembered: what the statement
before the transaction made or found, never what a batch made inside its own (a scrub's:
it may roll back). A connection ends with its server, so an id is never taken from
another one (a standby promoted after a failover may lack the last entries made, and give
their ids to others); a migration that rewrote a dictionary would have to end the
workers' connections."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from ingest.contract import jsonrows
from ingest.contract.connections import kept
from workers.consumer.enrich import Enricher

KEPT_MAX = 4_096  # ids of each dictionary a connection remembers (a few MB at most); cleared when full


@dataclass(slots=True)
class Known:
    """The entries a batch names: a ``Found.device`` -> its ``event_devices`` id, a
    ``Found.place`` -> its ``event_places`` id."""

    devices: dict[tuple[Any, ...], int] = field(default_factory=dict)
    places: dict[tuple[Any, ...], int] = field(default_factory=dict)

    def copy(self) -> Known:
        return Known(dict(self.devices), dict(self.places))


# made in one order (a new entry waits only on another batch's statement, never on a
# transaction), and found: made by this statement, or there before it. One made by another
# statement since this one's snapshot conflicts and is not seen: ``_ensure`` asks again
_ENSURE = """
WITH x AS (SELECT * FROM {rows}),
made AS (
    INSERT INTO {table} (doc) SELECT DISTINCT doc FROM x ORDER BY doc
    ON CONFLICT (doc) DO NOTHING
    RETURNING id, doc
)
SELECT x.n, coalesce(m.id, d.id) AS id
FROM x LEFT JOIN made m ON m.doc = x.doc LEFT JOIN {table} d ON d.doc = x.doc
"""
_SQL = {
    table: _ENSURE.format(table=table, rows=jsonrows.table(("integer", "jsonb"), "x(n, doc)"))
    for table in ("event_devices", "event_places")
}
_TRIES = 3


async def ids(
    conn: asyncpg.Connection,
    enricher: Enricher | None,
    visitors: Sequence[tuple[str | None, str | None]],
    known: Known | None = None,
) -> Known:
    """``known`` and the entry of every device and place these (User-Agent, address) pairs
    name that it lacks, made where there is none yet."""
    known = known.copy() if known is not None else Known()
    if enricher is None or not visitors:
        return known
    devices = {enricher.device_of(ua) for ua, _ in visitors} - known.devices.keys()
    # a place only where the address told more than its country (else the row names none)
    places = {p for p in (enricher.place_of(ip) for _, ip in visitors) if enricher.place_doc(p)}
    places -= known.places.keys()
    remembered = _remembered(conn)
    if remembered is not None:
        devices = _recall(remembered.devices, devices, known.devices)
        places = _recall(remembered.places, places, known.places)
    await _ensure(conn, "event_devices", devices, enricher.device_doc, known.devices)
    await _ensure(conn, "event_places", places, _doc_of(enricher), known.places)
    if remembered is not None and not conn.is_in_transaction():  # committed: each statement was its own
        _remember(remembered.devices, devices, known.devices)
        _remember(remembered.places, places, known.places)
    return known


def _remembered(conn: asyncpg.Connection) -> Known | None:
    """The ids this connection's server gave (module doc); None for a connection that keeps none."""
    held = kept(conn)
    if held is None:
        return None
    found = held.get(__name__)
    if not isinstance(found, Known):
        found = held[__name__] = Known()
    return found


def _recall(
    remembered: dict[tuple[Any, ...], int], wanted: set[tuple[Any, ...]], known: dict[tuple[Any, ...], int]
) -> set[tuple[Any, ...]]:
    """``wanted`` less what is remembered, which goes into ``known``."""
    missing = set()
    for entry in wanted:
        id_ = remembered.get(entry)
        if id_ is None:
            missing.add(entry)
        else:
            known[entry] = id_
    return missing


def _remember(
    remembered: dict[tuple[Any, ...], int], asked: set[tuple[Any, ...]], known: dict[tuple[Any, ...], int]
) -> None:
    if len(remembered) + len(asked) > KEPT_MAX:
        remembered.clear()
    remembered.update({entry: known[entry] for entry in asked})


def _doc_of(enricher: Enricher) -> Callable[[tuple[Any, ...]], dict[str, Any]]:
    return lambda place: enricher.place_doc(place) or {}  # never {}: only places that tell something


async def _ensure(
    conn: asyncpg.Connection,
    table: str,
    wanted_set: set[tuple[Any, ...]],
    doc: Callable[[tuple[Any, ...]], dict[str, Any]],
    known: dict[tuple[Any, ...], int],
) -> None:
    wanted = sorted(wanted_set, key=repr)
    for _ in range(_TRIES):
        todo = [d for d in wanted if d not in known]
        if not todo:
            return
        rows = await conn.fetch(_SQL[table], jsonrows.doc([(n, doc(d)) for n, d in enumerate(todo)]))
        known.update({todo[r["n"]]: r["id"] for r in rows if r["id"] is not None})
    missing = [d for d in wanted if d not in known]
    if missing:
        raise RuntimeError(f"{table}: {len(missing)} entries neither made nor found")
