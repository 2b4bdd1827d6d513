"""A pool's connections (``ingest.contract.connections.PgConnection``) as the worker's batches
use them, on the real Postgres, every statement seen as asyncpg sends it (its query logger):

- a batch leaves its connection as a new one is, so the pool's reset (a round trip) is
  skipped after it, and only after it: any other holder's session state is still undone;
- a connection remembers the dictionary ids its server gave (``workers.consumer.devices``),
  so a batch of devices, places and User-Agents seen before sends no statement for them;
  only what is committed is remembered, a text longer than ``KEPT_AGENT_LENGTH`` never is,
  and a new connection remembers nothing;
- a batch's statements keep one generic plan each in the connection's plan cache, however
  few links a batch names: none is planned anew for every batch."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from ingest.contract.connections import create_pg_pool, kept
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.manage import admin
from workers.consumer import devices
from workers.consumer.enrich import Enricher
from workers.consumer.store import write_batch

from ._world import BROWSER

FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
SAFARI = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15"
)
ADDRESSES = ("24.24.24.24", "89.160.20.112")  # residential: each tells an AS name, so a place
# what a holder could leave behind for the next one: the reset's business (a setting set
# to the value it had is none: asyncpg's type introspection turns jit off and back on)
STATE = """
SELECT (SELECT array_agg(name || '=' || setting ORDER BY name) FROM pg_settings
         WHERE source = 'session' AND setting IS DISTINCT FROM reset_val),
       (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()),
       (SELECT count(*) FROM pg_cursors),
       (SELECT count(*) FROM pg_listening_channels())
"""


@pytest.fixture
def enricher() -> Any:
    e = Enricher()
    try:
        yield e
    finally:
        e.close()


class Logged:
    """A pool of one connection whose every statement is recorded as it is sent."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def init(self, conn: asyncpg.Connection) -> None:
        conn.add_query_logger(lambda q: self.sent.append(q.query))

    def take(self) -> list[str]:
        sent, self.sent = self.sent, []
        return sent


@pytest.fixture
async def logged(settings: Settings, pg: asyncpg.Pool) -> AsyncIterator[tuple[asyncpg.Pool, Logged]]:
    log = Logged()
    pool = await create_pg_pool(settings, min_size=1, max_size=1, init=log.init)
    try:
        yield pool, log
    finally:
        await pool.close()


async def _clicks(pg: asyncpg.Pool, redis: Any, keys: Keys, code: str, agents: tuple[str, ...]) -> list[Envelope]:
    async with pg.acquire() as conn:
        ws = await admin.create_workspace(conn, f"Pool {code}")
        await admin.create_link(conn, redis, keys, workspace_id=ws["workspace_id"], code=code)
    return [
        Envelope(EventType.CLICK, Dialect.BIORE, {"code": code}, ws["workspace_id"], ip, agent)
        for agent in agents
        for ip in ADDRESSES
    ]


async def _named(pg: asyncpg.Pool, events: list[Envelope]) -> dict[tuple[str, str], tuple[int, int]]:
    """(User-Agent, address) -> the (device_id, place_id) their rows name."""
    rows = await pg.fetch(
        "SELECT ip, event_user_agent(user_agent, agent_id) AS user_agent, device_id, place_id FROM events"
        " WHERE event_id = ANY($1::uuid[])",
        [e.event_id for e in events],
    )
    return {(r["user_agent"], str(r["ip"])): (r["device_id"], r["place_id"]) for r in rows}


def _dictionaries(sent: list[str]) -> list[str]:
    return [q for q in sent if "event_devices" in q or "event_places" in q or "event_agents" in q]


def _resets(sent: list[str]) -> list[str]:
    return [q for q in sent if "pg_advisory_unlock_all" in q]


async def test_a_batch_leaves_a_fresh_session_and_only_its_release_skips_the_reset(
    logged: tuple[asyncpg.Pool, Logged], pg: asyncpg.Pool, redis: Any, keys: Keys, enricher: Enricher
) -> None:
    pool, log = logged
    fresh = await pool.fetchrow(STATE)
    assert _resets(log.take())  # an ordinary holder's release resets

    await write_batch(pool, await _clicks(pg, redis, keys, "pool-reset", (BROWSER, FIREFOX)), enricher)
    sent = log.take()
    assert any("INSERT INTO events" in q for q in sent) and not _resets(sent)
    assert await pool.fetchrow(STATE) == fresh  # nothing was left for the reset to undo

    # any other holder's session state is undone as before
    async with pool.acquire() as conn:
        await conn.execute("SET statement_timeout = '7s'")
        await conn.execute("SELECT pg_advisory_lock(424242)")
    assert _resets(log.take())
    assert await pool.fetchrow(STATE) == fresh

    # and a batch that fails leaves its connection to the reset
    with pytest.raises(asyncpg.PostgresError):
        async with pool.acquire() as conn:
            await conn.execute("SET work_mem = '5MB'")
            await conn.execute("SELECT 1/0")
    assert _resets(log.take())
    assert await pool.fetchrow(STATE) == fresh


async def test_a_connection_remembers_the_dictionary_ids_its_server_gave(
    logged: tuple[asyncpg.Pool, Logged],
    settings: Settings,
    pg: asyncpg.Pool,
    redis: Any,
    keys: Keys,
    enricher: Enricher,
) -> None:
    pool, log = logged
    first = await _clicks(pg, redis, keys, "pool-dict", (BROWSER, FIREFOX))
    await write_batch(pool, first, enricher)
    assert len(_dictionaries(log.take())) == 3  # devices, places, agents: asked once

    # what is remembered is what the server holds
    async with pool.acquire() as conn:
        remembered = (kept(conn) or {})[devices.__name__]
    held = {r["id"]: r["doc"] for r in await pg.fetch("SELECT id, doc FROM event_devices")}
    assert len(remembered.devices) == 2 and len(remembered.places) == 2
    assert all(held[i] == enricher.device_doc(d) for d, i in remembered.devices.items())
    places = {r["id"]: r["doc"] for r in await pg.fetch("SELECT id, doc FROM event_places")}
    assert all(places[i] == enricher.place_doc(p) for p, i in remembered.places.items())
    agents = {r["ua"]: r["id"] for r in await pg.fetch("SELECT id, ua FROM event_agents")}
    assert remembered.agents == {ua: agents[ua] for ua in (BROWSER, FIREFOX)}

    # the same devices and places again: no statement for them, and the rows name the same
    again = await _clicks(pg, redis, keys, "pool-dict-2", (FIREFOX, BROWSER))
    assert (await write_batch(pool, again, enricher)).inserted == len(again)
    assert not _dictionaries(log.take())
    before, after = await _named(pg, first), await _named(pg, again)
    assert after == before and all(d is not None and p is not None for d, p in after.values())

    # what a transaction made is not remembered: it may roll back
    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.DivisionByZeroError):
            async with conn.transaction():
                inside = await devices.ids(conn, enricher, [(SAFARI, ADDRESSES[0])])
                await conn.execute("SELECT 1/0")  # the batch fails after it: all of it rolls back
        assert enricher.device_of(SAFARI) in inside.devices
        assert enricher.device_of(SAFARI) not in remembered.devices
        # outside one, it is made (again: the rollback took it) and then remembered
        outside = await devices.ids(conn, enricher, [(SAFARI, ADDRESSES[0])])
        assert remembered.devices[enricher.device_of(SAFARI)] == outside.devices[enricher.device_of(SAFARI)]
    log.take()

    # another connection (another pool here; a restart or a failover there) remembers nothing
    other_log = Logged()
    other = await create_pg_pool(settings, min_size=1, max_size=1, init=other_log.init)
    try:
        await write_batch(other, await _clicks(pg, redis, keys, "pool-dict-3", (BROWSER,)), enricher)
    finally:
        await other.close()
    assert len(_dictionaries(other_log.sent)) == 3

    # a text longer than a connection keeps is named right, and asked each time
    long = BROWSER + " x" * devices.KEPT_AGENT_LENGTH
    for code in ("pool-dict-4", "pool-dict-5"):
        batch = await _clicks(pg, redis, keys, code, (long,))
        await write_batch(pool, batch, enricher)
        assert [q for q in log.take() if "event_agents" in q]
        named = await pg.fetchval(
            "SELECT array_agg(DISTINCT event_user_agent(user_agent, agent_id)) FROM events WHERE event_id = ANY($1)",
            [e.event_id for e in batch],
        )
        assert named == [long]
    assert long not in remembered.agents
    assert await pg.fetchval("SELECT count(*) FROM event_agents WHERE ua = $1", long) == 1


# what Postgres's plan cache holds for this session: each prepared statement's plans
PLANS = """
SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements
WHERE statement NOT LIKE '%typeinfo%' AND statement NOT LIKE '%set_config(%'
"""


async def test_a_batch_naming_few_links_keeps_one_generic_plan_per_statement(
    logged: tuple[asyncpg.Pool, Logged], pg: asyncpg.Pool, redis: Any, keys: Keys, enricher: Enricher
) -> None:
    # The plan cache makes custom plans for a statement's first five executions, then keeps
    # its generic plan unless those custom plans cost less: a statement whose estimate
    # follows its values (``= ANY($1::text[])`` of one or two codes) was then planned anew
    # at every batch (``ingest.contract.plans``). A trickle's batches name a link or two,
    # and hold a lead or a conversion
    pool, _ = logged
    first = await _clicks(pg, redis, keys, "pool-plans", (BROWSER,))
    ws, code = first[0].workspace_id, "pool-plans"
    batches = 12
    for n in range(batches):
        clicked = (
            first if n == 0 else [Envelope(EventType.CLICK, Dialect.BIORE, {"code": code}, ws, ip) for ip in ADDRESSES]
        )
        lead = {"code": code, "external_id": f"plans-{n}", "name": "Sign Up", "email": f"plans-{n}@example.org"}
        converted = {"code": code, "visitor_id": f"v{n}", "dedupe": f"plans:{n}"}
        batch = [
            *clicked,
            Envelope(EventType.LEAD, Dialect.REFPORT, lead, ws),
            Envelope(EventType.CONVERSION, Dialect.BRICQS, converted, ws),
        ]
        assert (await write_batch(pool, batch, enricher)).inserted == len(batch)
    plans = await pool.fetch(PLANS)
    texts = [r["statement"] for r in plans]
    reads = (
        "webhook_events",
        "commission FROM programs",
        "SELECT 1 FROM affiliates",
        "email FROM affiliates",
        "erased_ids",
    )
    for read in reads:
        assert sum(read in t for t in texts) == 1, (read, [t[:80] for t in texts])
    for r in plans:
        # run at every batch: five custom plans, then the generic one from there on
        if r["generic_plans"] + r["custom_plans"] >= batches:
            assert r["custom_plans"] <= 5 and r["generic_plans"] >= batches - 5, dict(r)


def test_what_a_connection_remembers_is_bounded() -> None:
    """Past ``KEPT_MAX`` entries a dictionary's memory starts again: never more than the bound."""
    remembered: dict[tuple[Any, ...], int] = {("device", i): i for i in range(devices.KEPT_MAX)}
    known: dict[tuple[Any, ...], int] = {("device", "new"): 1, ("device", "newer"): 2}
    devices._remember(remembered, set(known), known)
    assert remembered == known
    devices._remember(remembered, {("device", "new")}, known)  # within the bound: kept, added to
    assert len(remembered) == 2


async def test_batches_meeting_the_same_new_user_agents_at_once_name_one_entry_each(pg: asyncpg.Pool) -> None:
    # each text's entry is made by one statement; the other waits for it, finds the conflict
    # outside its snapshot, and asks again (``devices._ensure``)
    texts = [f"Concurrent/{i} ({uuid.uuid4().hex})" for i in range(40)]
    async with pg.acquire() as one, pg.acquire() as two:
        found = await asyncio.gather(
            *(devices.ids(conn, None, [], agents=order) for conn, order in ((one, texts), (two, texts[::-1])))
        )
    assert found[0].agents == found[1].agents and sorted(found[0].agents) == sorted(texts)
    held = await pg.fetch("SELECT id, ua FROM event_agents WHERE ua = ANY($1::text[])", texts)
    assert {r["ua"]: r["id"] for r in held} == found[0].agents and len(held) == len(texts)
