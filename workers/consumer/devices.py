"""The enrichment's dictionaries (schema.sql): what repeats across clicks, stored once and
named by each enriched row instead of written into every row's ``enrichment``.

- ``event_devices`` (version 16), named by ``device_id``: what a User-Agent says of the
  browser, and the versions of the data and parsers that said it.
- ``event_places`` (version 17), named by ``place_id``: what the geo data says of an
  address's network beside its country and AS number (AS name, city, region,
  coordinates); none where it says nothing more.
- ``event_agents`` (version 20), named by ``agent_id``: a User-Agent's text, on every row
  that has one, enriched or not, keyed by its SHA-256.

A batch's entries are made before its transaction, in a statement of their own that
commits at once (``store._write_retried``): a new browser build or network is written once,
by whichever batch meets it first, and no batch holds a lock on it while it stores its
events. An entry made for a batch that then rolls back is named by no row; it is no one's
data (the geo data's and the parsers', not a visitor's; a User-Agent's text is a browser
build's, named by the rows of everyone who uses it: an erasure scrubs the row's names of
them, never the dictionary) and the next batch that meets it names it. Entries are never
deleted, so an id once read stays right: the devices and places are bounded by what the
data can say (browser builds seen times the worker builds that parsed them; the geo data's
networks), not by the traffic; the agents by the texts browsers send, which a client that
makes up a new one for every click grows by what its rows would have held themselves.

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

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg

from ingest.contract import jsonrows
from ingest.contract.connections import kept
from workers.consumer.enrich import Enricher

K = TypeVar("K", tuple[Any, ...], str)  # a dictionary's entry as a batch names it
KEPT_MAX = 4_096  # ids of each dictionary a connection remembers (a few MB at most); cleared when full
KEPT_AGENT_LENGTH = 512  # a longer User-Agent's id is asked each time, never remembered (2 MB at most)


@dataclass(slots=True)
class Known:
    """The entries a batch names: a ``Found.device`` -> its ``event_devices`` id, a
    ``Found.place`` -> its ``event_places`` id, a User-Agent's text -> its ``event_agents`` id."""

    devices: dict[tuple[Any, ...], int] = field(default_factory=dict)
    places: dict[tuple[Any, ...], int] = field(default_factory=dict)
    agents: dict[str, int] = field(default_factory=dict)

    def copy(self) -> Known:
        return Known(dict(self.devices), dict(self.places), dict(self.agents))


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
# the same for the agents, by their digest (the worker's: sha256 of the text's UTF-8)
_SQL["event_agents"] = f"""
WITH x AS (SELECT * FROM {jsonrows.table(("integer", "text", "text"), "x(n, hex, ua)")}),
made AS (
    INSERT INTO event_agents (digest, ua) SELECT DISTINCT ON (hex) decode(hex, 'hex'), ua FROM x ORDER BY hex
    ON CONFLICT (digest) DO NOTHING
    RETURNING id, digest
)
SELECT x.n, coalesce(m.id, d.id) AS id
FROM x LEFT JOIN made m ON m.digest = decode(x.hex, 'hex') LEFT JOIN event_agents d ON d.digest = decode(x.hex, 'hex')
"""
_TRIES = 3


async def ids(
    conn: asyncpg.Connection,
    enricher: Enricher | None,
    visitors: Sequence[tuple[str | None, str | None]],
    known: Known | None = None,
    agents: Iterable[str] = (),
) -> Known:
    """``known`` and the entry of every device and place these (User-Agent, address) pairs
    name that it lacks, and of every User-Agent text of ``agents``, made where there is
    none yet."""
    known = known.copy() if known is not None else Known()
    await _agents(conn, set(agents) - known.agents.keys(), known)
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


async def _agents(conn: asyncpg.Connection, wanted: set[str], known: Known) -> None:
    if not wanted:
        return
    remembered = _remembered(conn)
    if remembered is not None:
        wanted = _recall(remembered.agents, wanted, known.agents)
    await _ensure(conn, "event_agents", wanted, _agent_row, known.agents)
    if remembered is not None and not conn.is_in_transaction():
        short = {ua for ua in wanted if len(ua) <= KEPT_AGENT_LENGTH}
        _remember(remembered.agents, short, known.agents)


def _agent_row(ua: str) -> tuple[str, str]:
    return hashlib.sha256(ua.encode()).hexdigest(), ua


def _remembered(conn: asyncpg.Connection) -> Known | None:
    """The ids this connection's server gave (module doc); None for a connection that keeps none."""
    held = kept(conn)
    if held is None:
        return None
    found = held.get(__name__)
    if not isinstance(found, Known):
        found = held[__name__] = Known()
    return found


def _recall(remembered: dict[K, int], wanted: set[K], known: dict[K, int]) -> set[K]:
    """``wanted`` less what is remembered, which goes into ``known``."""
    missing = set()
    for entry in wanted:
        id_ = remembered.get(entry)
        if id_ is None:
            missing.add(entry)
        else:
            known[entry] = id_
    return missing


def _remember(remembered: dict[K, int], asked: set[K], known: dict[K, int]) -> None:
    if len(remembered) + len(asked) > KEPT_MAX:
        remembered.clear()
    remembered.update({entry: known[entry] for entry in asked})


def _doc_of(enricher: Enricher) -> Callable[[tuple[Any, ...]], dict[str, Any]]:
    return lambda place: enricher.place_doc(place) or {}  # never {}: only places that tell something


async def _ensure(
    conn: asyncpg.Connection,
    table: str,
    wanted_set: set[Any],
    doc: Callable[[Any], Any],
    known: dict[Any, int],
) -> None:
    """Each of ``wanted_set`` into ``known``, its entry made where there is none: ``doc``
    gives its row's value (a tuple: its values)."""
    wanted = sorted(wanted_set, key=repr)
    for _ in range(_TRIES):
        todo = [d for d in wanted if d not in known]
        if not todo:
            return
        rows = await conn.fetch(_SQL[table], jsonrows.doc([(n, *_values(doc(d))) for n, d in enumerate(todo)]))
        known.update({todo[r["n"]]: r["id"] for r in rows if r["id"] is not None})
    missing = [d for d in wanted if d not in known]
    if missing:
        raise RuntimeError(f"{table}: {len(missing)} entries neither made nor found")


def _values(value: Any) -> tuple[Any, ...]:
    return value if isinstance(value, tuple) else (value,)
