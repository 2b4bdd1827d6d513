"""A workspace moved between shards (docs/shards.md, "Moving a workspace"): every row it
owns arrives on the target as the source held it, its erasures, dedupe records, sales and
commissions included, another workspace untouched; and a move whose command was killed
after any of its steps is taken up again by the same command, losing nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

import asyncpg
import pytest

from ingest.contract.connections import create_pg_pool
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.ledger import directory as placement_directory
from ingest.ledger import placement
from workers.consumer import consume, waiting
from workers.ops.move import MoveError, Mover, plan

from ._procs import CliError, Procs
from ._world import call
from .conftest import wait_for
from .test_e2e import TRACKED, fire
from .test_shards import _COUNTERS_OFF, _setup, auth

DUB_CLICK = {"domain": "shop.test", "key": "PARTNER123"}
# an event's ids in a shard's own dictionaries, compared by what they name
_NAMED = (
    "SELECT e.event_id, (SELECT d.doc FROM event_devices d WHERE d.id = e.device_id) AS device,"
    " (SELECT p.doc FROM event_places p WHERE p.id = e.place_id) AS place,"
    " (SELECT a.ua FROM event_agents a WHERE a.id = e.agent_id) AS agent"
    " FROM events e WHERE e.workspace_id = $1 ORDER BY e.event_id"
)
_IDS = ("agent_id", "device_id", "place_id")


async def _world(procs: Procs, edge: str, name: str, shard: str) -> dict[str, Any]:
    """A workspace with a link, commission rules, clicks, two customers' leads, a sale, an
    erasure and a do-not-track entry."""
    ws = await procs.cli("workspace", "create", name, "--shard", shard)
    code = "PARTNER123" if name == "Moving" else f"stay{name}"
    link = await procs.cli(
        "link", "create", "--workspace", ws["workspace_id"], "--code", code, "--url", "https://shop.test/"
    )
    wsid = ("--workspace", ws["workspace_id"])
    await procs.cli("commission", "set", link["program_id"], *wsid, "--sale-bps", "1000", "--hold-days", "0")
    h = auth(ws["api_key"])
    assert all(r == (200, TRACKED) for r in await fire(edge, [code] * 5))
    if name != "Moving":
        return dict(ws)
    for customer in ("cust_a", "cust_gone"):
        status, click, _ = await call("POST", f"{edge}/track/click", json=DUB_CLICK, headers={"User-Agent": customer})
        assert status == 200, click
        lead = {"clickId": click["clickId"], "eventName": "Sign up", "customerExternalId": customer}
        assert (await call("POST", f"{edge}/track/lead", json=lead, headers=h))[0] == 200
    await procs.cli("work", "--drain")
    sale = {"customerExternalId": "cust_a", "amount": 5000, "currency": "usd", "invoiceId": "inv-1"}
    status, out, _ = await call("POST", f"{edge}/track/sale", json=sale, headers=h)
    assert status == 200, out
    await procs.cli("work", "--drain")
    eraser = await procs.cli("keys", "create", "--workspace", ws["workspace_id"], "--scopes", "erase")
    assert (await call("DELETE", f"{edge}/v1/customers/cust_gone", headers=auth(eraser["api_key"])))[0] == 202
    suppressed = {"kind": "customer", "value": "blocked"}
    assert (await call("POST", f"{edge}/v1/suppressions", json=suppressed, headers=h))[0] in (200, 201)
    await procs.cli("work", "--drain")
    return dict(ws)


async def _moving(procs: Procs, shard_url: str) -> tuple[str, dict[str, Any]]:
    """Shard b added, an edge, and the workspace to move (``_world``) on ``default``."""
    await procs.cli("migrate")
    await procs.cli("shards", "add", "b", shard_url)
    edge = await procs.start_edge()
    return edge, await _world(procs, edge, "Moving", "default")


@asynccontextmanager
async def _two_copies(
    settings: Settings, tmp_path: Any, two_shards: tuple[str, str]
) -> AsyncIterator[tuple[dict[str, Any], asyncpg.Connection, asyncpg.Connection]]:
    """The workspace to move on ``default`` (``_moving``), and connections to the source
    and the target for a ``Mover`` of the test's own."""
    directory_url, shard_url = two_shards
    procs = Procs(settings.model_copy(update={"database_url": directory_url}), tmp_path)
    try:
        _, ws = await _moving(procs, shard_url)
        source, target = await asyncpg.connect(directory_url), await asyncpg.connect(shard_url)
        try:
            yield ws, source, target
        finally:
            await source.close()
            await target.close()
    finally:
        procs.stop_all()


async def _rows(conn: asyncpg.Connection, ws: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every planned table's rows of ``ws``, in key order; an event's dictionary ids as
    what they name."""
    held: dict[str, list[tuple[Any, ...]]] = {}
    for t in await plan(conn):
        cols = [c for c in t.columns if not (t.name == "events" and c in _IDS)]
        order = ", ".join(f'"{c}"' for c in (t.key or cols[:1]))
        rows = await conn.fetch(
            f'SELECT {", ".join(chr(34) + c + chr(34) for c in cols)} FROM "{t.name}" WHERE {t.where} ORDER BY {order}',
            ws,
        )
        held[t.name] = [tuple(r) for r in rows]
    held["events named"] = [tuple(r) for r in await conn.fetch(_NAMED, ws)]
    return held


async def test_a_move_carries_every_row_of_the_workspace(
    settings: Settings, tmp_path: Any, two_shards: tuple[str, str]
) -> None:
    directory_url, shard_url = two_shards
    s = settings.model_copy(update={"database_url": directory_url})
    procs = Procs(s, tmp_path)
    try:
        edge, ws = await _moving(procs, shard_url)
        stays = await _world(procs, edge, "Stays", "default")
        source = await asyncpg.connect(directory_url)
        target = await asyncpg.connect(shard_url)
        try:
            before = await _rows(source, ws["workspace_id"])
            others = await _rows(source, stays["workspace_id"])
            for table in (
                "erasures",
                "erased_ids",
                "commissions",
                "sales",
                "event_dedupe",
                "suppressions",
                "customers",
            ):
                assert before[table], f"the world has no {table} row: the test would prove nothing"
            moved = await procs.cli("workspace", "move", ws["workspace_id"], "--to", "b")
            assert moved["state"] == "switched"
            after = await _rows(target, ws["workspace_id"])
            assert after == before  # every row, as the source held it
            assert await _rows(source, stays["workspace_id"]) == others
            assert all(not rows for rows in (await _rows(target, stays["workspace_id"])).values())
            assert await target.fetch(_COUNTERS_OFF) == []
            # the erased customer stays erased on the target; the sale's commission is there
            assert await target.fetchval("SELECT count(*) FROM customers WHERE external_id = 'cust_gone'") == 0
            h = auth(ws["api_key"])
            assert (await call("GET", f"{edge}/v1/customers/cust_gone", headers=h))[0] == 404
            status, paid, _ = await call("GET", f"{edge}/v1/commissions", headers=h)
            assert status == 200 and [c["amount"] for c in paid["data"]] == [500], paid
            status, again, _ = await call("GET", f"{edge}/v1/customers/cust_a", headers=h)
            assert status == 200 and again["external_id"] == "cust_a", again
        finally:
            await source.close()
            await target.close()
    finally:
        procs.stop_all()


@pytest.mark.parametrize(
    ("step", "then"),
    [
        ("copy", "again"),
        ("fence", "again"),
        ("finish", "again"),
        ("switch", "again"),
        ("fence", "abort"),
        ("finish", "abort"),
    ],
)
async def test_a_move_killed_after_a_step_is_taken_up_again(
    settings: Settings, tmp_path: Any, two_shards: tuple[str, str], redis: Any, step: str, then: str
) -> None:
    """Killed after a step, the move is run again to its end (after its switch: the run says
    it switched, where it used to refuse for ever, its old copy left; the generative test's
    seed 1594608347, whose moves could then never be healed); or, with ``--abort``, undone:
    the workspace stays on its shard, every event stored there, the target's copy gone, and
    a move after it goes through; after its last copy, ``--abort`` is refused, and the
    move run again switches."""
    directory_url, shard_url = two_shards
    s = settings.model_copy(update={"database_url": directory_url})
    keys = Keys(s.stream_prefix, s.partitions)
    procs = Procs(s, tmp_path)
    try:
        await procs.cli("migrate")
        await procs.cli("shards", "add", "b", shard_url)
        ws = await procs.cli("workspace", "create", "Moving", "--shard", "default")
        await procs.cli("link", "create", "--workspace", ws["workspace_id"], "--code", "mcode")
        edge = await procs.start_edge(REFSTREAM_CLICK_RATE_LIMIT_PER_MIN="1000000")
        procs.start("work")
        replies: list[tuple[int, object]] = []
        stop = asyncio.Event()

        async def load() -> None:
            while not stop.is_set():
                replies.extend(await fire(edge, ["mcode"] * 10, concurrency=2))

        firing = asyncio.create_task(load())
        try:
            await wait_for(lambda: _any(replies), what="clicks answered")
            killed = procs.start(
                "workspace", "move", ws["workspace_id"], "--to", "b", failpoint=f"move_crash_after:{step}"
            )
            code = await asyncio.to_thread(killed.wait, 120)
            assert code == -9, f"the move was not killed after {step}: exit {code}"
            procs.running.remove(killed)
            state = await _state(directory_url, ws["workspace_id"])
            # killed after its switch, before its answer: run again, it says it is done
            assert state == {"copy": "copying", "switch": "switched"}.get(step, "fenced"), state
            if then == "abort" and step == "finish":
                with pytest.raises(CliError, match="made its last copy"):
                    await procs.cli("workspace", "move", ws["workspace_id"], "--abort")
            elif then == "abort":
                undone = await procs.cli("workspace", "move", ws["workspace_id"], "--abort")
                assert (undone["on"], undone["aborted"]) == ("default", "fenced"), undone
                answered = len(replies)  # each stored on the source, the room's included
                # the room drains a page a second (waiting.PAGE, consume.WAITING_EVERY_S): its
                # backlog, all the clicks answered while fenced, sets how long that takes
                drained_in = answered / waiting.PAGE * consume.WAITING_EVERY_S
                await wait_for(
                    lambda: _grows_on(directory_url, answered),
                    timeout=30.0 + drained_in,
                    what="the source taking writes again",
                )
                stored_there = await _events(directory_url)
                assert await _events(shard_url) == 0  # the partial copy deleted
            done = await procs.cli("workspace", "move", ws["workspace_id"], "--to", "b", timeout=300)
            assert done["state"] == "switched"
        finally:
            stop.set()
            await firing
        if then == "abort" and step != "finish":
            assert stored_there > 0
        assert replies and all(r == (200, TRACKED) for r in replies)
        await procs.cli("work", "--drain")
        assert await redis.scard(keys.waiting_rooms) == 0
        target = await asyncpg.connect(shard_url)
        try:
            assert await target.fetchval("SELECT count(*) FROM events") == len(replies)
            assert await target.fetchval("SELECT clicks FROM links WHERE code = 'mcode'") == len(replies)
            assert await target.fetch(_COUNTERS_OFF) == []
        finally:
            await target.close()
    finally:
        procs.stop_all()


async def _events(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        n: int = await conn.fetchval("SELECT count(*) FROM events")
        return n
    finally:
        await conn.close()


async def _grows_on(url: str, than: int) -> bool:
    return await _events(url) >= than


async def _any(replies: list[Any]) -> bool:
    return len(replies) >= 20


async def _state(url: str, ws: str) -> tuple[str, ...] | str:
    conn = await asyncpg.connect(url)
    try:
        return str(await conn.fetchval("SELECT state FROM workspace_moves WHERE workspace_id = $1", ws))
    finally:
        await conn.close()


async def test_a_management_write_in_flight_holds_the_fence_and_none_passes_it(
    settings: Settings, tmp_path: Any, two_shards: tuple[str, str]
) -> None:
    directory_url, shard_url = two_shards
    s = settings.model_copy(update={"database_url": directory_url})
    procs = Procs(s, tmp_path)
    ws = (await _setup(procs, shard_url))["workspace_id"]
    pool = await create_pg_pool(s, min_size=1, max_size=4)
    place = placement.Placement.over(s, pool)
    source, target = await asyncpg.connect(directory_url), await asyncpg.connect(shard_url)
    try:
        mover = Mover(UUID(ws), source, target)
        async with place.writing(ws):  # a write under way on the source
            fencing = asyncio.create_task(mover.fence("b"))
            done, _ = await asyncio.wait({fencing}, timeout=1.0)
            assert not done, "the fence went up beside a write in flight"
        await asyncio.wait_for(fencing, 30)  # and goes up once the write is over
        assert await source.fetchval("SELECT moved_to FROM workspaces WHERE id = $1", UUID(ws)) == "b"
        with pytest.raises(placement.Moved):  # no write begins on the source after it
            async with place.writing(ws):
                raise AssertionError("a write began past the fence")
    finally:
        await source.close()
        await target.close()
        await place.close()
        await pool.close()


async def test_a_management_write_whose_fence_session_ends_during_it_is_not_refused(
    settings: Settings, tmp_path: Any, two_shards: tuple[str, str]
) -> None:
    """The same kind, a step earlier: the guard connection's session ended while the write
    ran (Postgres killed, or the session terminated). Letting go of its lock then failed,
    and terminating the connection failed too, since the pool had let it go as it saw it
    close: that ``InterfaceError`` reached the route, which answered a plain 503 for a
    refund it had recorded (the generative test's ``refused_write_kept``, seed 1572826553,
    a pg-kill during a move). A lost session's lock went with it: the write stands."""
    ws, pool, place, admin = await _guarded(settings, tmp_path, two_shards)
    held = (
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND mode = 'ShareLock' AND granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    try:
        await place.fresh()
        wrote = False
        async with place.writing(ws):
            guards = [r["pid"] for r in await admin.fetch(held)]
            assert len(guards) == 1, guards
            await admin.execute("SELECT pg_terminate_backend($1)", guards[0])
            await wait_for(lambda: _gone(admin, guards[0]), what="the guard's session ended")
            wrote = True
        assert wrote
        async with place.writing(ws):  # and the next write finds a live guard
            assert len(await admin.fetch(held)) == 1
    finally:
        await admin.close()
        await place.close()
        await pool.close()


async def _gone(admin: asyncpg.Connection, pid: int) -> bool:
    return not await admin.fetchval("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)", pid)


class _DiesAtRelease:
    """A guard pool whose connection's session Postgres ends as it goes back to the pool:
    after the lock was let go, before the pool's reset (a real termination, timed)."""

    def __init__(self, pool: asyncpg.Pool, admin: asyncpg.Connection) -> None:
        self.pool, self.admin = pool, admin

    def acquire(self) -> _DyingHold:
        return _DyingHold(self)

    async def release(self, conn: Any) -> None:
        # the session ended as the reset begins: its client has yet to see it go
        await self.admin.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
        await self.pool.release(conn)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)


class _DyingHold:
    """``pool.acquire()``'s two forms (``await`` and ``async with``), released through ``owner``."""

    def __init__(self, owner: _DiesAtRelease) -> None:
        self.owner, self.conn = owner, None

    def __await__(self) -> Any:
        return self.owner.pool.acquire().__await__()

    async def __aenter__(self) -> Any:
        self.conn = await self.owner.pool.acquire()
        return self.conn

    async def __aexit__(self, *exc: object) -> None:
        await self.owner.release(self.conn)


async def _guarded(
    settings: Settings, tmp_path: Any, two_shards: tuple[str, str]
) -> tuple[str, asyncpg.Pool, placement.Placement, asyncpg.Connection]:
    """A workspace on ``default`` beside shard b, a placement over the directory's pool (its
    management writes take the fence guard), and an admin connection to the directory."""
    directory_url, shard_url = two_shards
    s = settings.model_copy(update={"database_url": directory_url})
    ws = (await _setup(Procs(s, tmp_path), shard_url, name="Guarded"))["workspace_id"]
    pool = await create_pg_pool(s, min_size=1, max_size=4)
    return ws, pool, placement.Placement.over(s, pool), await asyncpg.connect(directory_url)


async def test_a_management_write_whose_fence_connection_dies_after_it_is_not_refused(
    settings: Settings, tmp_path: Any, two_shards: tuple[str, str]
) -> None:
    """A management write (a refund, a link) holds its workspace's fence lock on a guard
    connection of its own. Postgres killed after the write committed and the lock was let
    go, before that connection went back to its pool: the pool's reset failed, and its
    error reached the route, which answered a plain 503 for a refund it had recorded (the
    generative test's ``refused_write_kept``, seed 2002375128, a pg-kill). The write's
    outcome is its own: the guard's release no longer speaks for it."""
    ws, pool, place, admin = await _guarded(settings, tmp_path, two_shards)
    try:
        await place.fresh()
        guard = await place._guard("default")
        place._guards["default"] = _DiesAtRelease(guard, admin)
        wrote = False
        async with place.writing(ws):
            wrote = True
        assert wrote
        place._guards["default"] = guard
        async with place.writing(ws):  # and the next write finds a live guard
            pass
    finally:
        await admin.close()
        await place.close()
        await pool.close()


async def test_a_catch_up_writes_over_a_row_whose_identity_it_may_not_set(
    settings: Settings, tmp_path: Any, two_shards: tuple[str, str]
) -> None:
    directory_url, shard_url = two_shards
    s = settings.model_copy(update={"database_url": directory_url})
    procs = Procs(s, tmp_path)
    try:
        _, ws = await _moving(procs, shard_url)
        source, target = await asyncpg.connect(directory_url), await asyncpg.connect(shard_url)
        try:
            mover = Mover(UUID(ws["workspace_id"]), source, target)
            _, since = await mover.copy(None)
            # a commission changed after the copy: its ledger order (GENERATED ALWAYS) stays
            await source.execute(
                "UPDATE commissions SET status = 'approved' WHERE workspace_id = $1", ws["workspace_id"]
            )
            n, _ = await mover.copy(since)
            assert n >= 1
            rows = "SELECT seq, status FROM commissions WHERE workspace_id = $1 ORDER BY seq"
            assert await target.fetch(rows, ws["workspace_id"]) == await source.fetch(rows, ws["workspace_id"])
            assert {r["status"] for r in await target.fetch(rows, ws["workspace_id"])} == {"approved"}
            # a row changed before a crashed move is run again: the new run's copy writes over
            # what the first left, not around it (the catch ups see only changes after it)
            await source.execute("UPDATE links SET clicks = clicks + 7 WHERE workspace_id = $1", ws["workspace_id"])
            again = Mover(UUID(ws["workspace_id"]), source, target)
            _, since = await again.copy(None)
            await again.finish(since)
            assert await _rows(target, ws["workspace_id"]) == await _rows(source, ws["workspace_id"])
        finally:
            await source.close()
            await target.close()
    finally:
        procs.stop_all()


async def test_a_request_that_outwaits_a_moves_fence_is_its_routes_503(
    settings: Settings, tmp_path: Any, two_shards: tuple[str, str]
) -> None:
    """A workspace fenced longer than a request waits for its pool (``FENCE_WAIT_S``): the
    request is the route's 503 in its own shape, never a 500; a write's is "may be stored"
    (``Refstream-Outcome: unknown``: it cannot tell what it wrote before the wait)."""
    directory_url, shard_url = two_shards
    s = settings.model_copy(update={"database_url": directory_url})
    procs = Procs(s, tmp_path)
    try:
        edge, ws = await _moving(procs, shard_url)
        h = auth(ws["api_key"])
        directory = await asyncpg.connect(directory_url)
        try:
            await placement_directory.fence(directory, UUID(ws["workspace_id"]), True)
            # the edge sees the fence at its next read of the directory, within REFRESH_S: the
            # bound a move waits out too (``refstream workspace move``), since no edge says when
            # it has read; a request before it is served from the source, which is no fault
            await asyncio.sleep(2 * placement.REFRESH_S)
            # a Dub lead whose customer's click is found in Postgres (an empty clickId), Bricqs'
            # stats, a management read and a management write, all at once
            lead = {"clickId": "", "eventName": "Upgrade", "customerExternalId": "cust_a"}
            answers = await asyncio.gather(
                call("POST", f"{edge}/track/lead", json=lead, headers=h),
                call("GET", f"{edge}/api/v1/referrals/stats/cust_a", headers={"X-API-Key": ws["api_key"]}),
                call("GET", f"{edge}/v1/events", headers=h),
                call("POST", f"{edge}/v1/programs", json={"name": "During the move"}, headers=h),
            )
        finally:
            await placement_directory.fence(directory, UUID(ws["workspace_id"]), False)
            await directory.close()
        (lead_status, lead_out, _), (stats_status, stats_out, _), (read_status, read_out, _) = answers[:3]
        write_status, write_out, write_h = answers[3]
        assert lead_status == 503 and lead_out["error"]["code"] == "internal_server_error", lead_out  # Dub's shape
        assert (stats_status, stats_out) == (503, {"error": "unavailable", "message": "Try again shortly"})  # Bricqs'
        assert (read_status, read_out) == (503, {"error": "unavailable"})
        assert (write_status, write_out) == (503, {"error": "unavailable"})
        assert write_h.get("Refstream-Outcome") == "unknown", write_h
    finally:
        procs.stop_all()


async def test_a_writer_holding_a_stale_shard_writes_nothing_where_a_move_would_lose_it(
    settings: Settings, tmp_path: Any, two_shards: tuple[str, str]
) -> None:
    """An import finds its workspace's shard as it starts, and writes there for as long as it
    runs. A move's target held a live-looking copy from its first copy on, and a dropped copy
    held nothing to fence: an import that wrote into either had its visitors deleted and its
    counts written over by the move's catch ups, its events kept (the generative test's
    seeds 1972980936, 874251079, 1604852664: events with no unique visitor and no count).
    Until its switch, a move's target is fenced as a moved-away copy is; a dropped copy is
    nowhere an import may write."""
    from ingest.contract.events import Dialect, Envelope, EventType
    from ingest.manage import deletion
    from workers.consumer import store

    directory_url, shard_url = two_shards
    s = settings.model_copy(update={"database_url": directory_url})
    procs = Procs(s, tmp_path)
    ws = (await _setup(procs, shard_url, code="stalecode"))["workspace_id"]
    imported = store.Effects(webhooks=False, fraud=False, commissions=False, imported=True, counters_last=True)

    def click() -> Envelope:
        return Envelope(EventType.CLICK, Dialect.BIORE, {"code": "stalecode"}, ws, "198.51.100.9", "Mozilla/5.0")

    source, target = await asyncpg.connect(directory_url), await asyncpg.connect(shard_url)
    on_source = await create_pg_pool(s, min_size=1, max_size=2)
    on_target = await create_pg_pool(s.model_copy(update={"database_url": shard_url}), min_size=1, max_size=2)
    try:
        mover = Mover(UUID(ws), source, target)
        _, since = await mover.copy(None)
        for effects in (imported, store.LIVE):  # the target mid-copy: the import's and a stale worker's
            with pytest.raises(placement.Moved):
                await store.write_batch(on_target, [click()], None, effects, fence=[ws])
        assert await target.fetchval("SELECT count(*) FROM events") == 0
        await mover.fence("b")
        await mover.finish(since)
        written = await store.write_batch(on_target, [click()], None, imported, fence=[ws])
        assert written.inserted == 1  # switched: the target is the workspace's
        async with on_source.acquire() as conn, conn.transaction():  # the old copy dropped, as --drop-old does
            await deletion.delete_rows(conn, UUID(ws))
        with pytest.raises(placement.Moved):
            await store.write_batch(on_source, [click()], None, imported, fence=[ws])
    finally:
        await source.close()
        await target.close()
        await on_source.close()
        await on_target.close()
        procs.stop_all()


# a link's unique visitors against its clicks' distinct (day, visitor) and its counter
_VISITS_OFF = """
SELECT l.code, l.unique_clicks,
       (SELECT count(*) FROM link_visitor_days v WHERE v.link_id = l.id) AS rows,
       (SELECT count(DISTINCT ((e.received_at AT TIME ZONE 'UTC')::date, e.visitor_key)) FROM events e
        WHERE e.link_id = l.id AND e.type = 1 AND NOT e.is_bot AND e.visitor_key IS NOT NULL) AS clicked
FROM links l WHERE l.workspace_id = $1
"""


async def test_a_move_taken_up_after_its_last_copy_keeps_what_the_targets_erasures_renamed(
    settings: Settings, tmp_path: Any, two_shards: tuple[str, str]
) -> None:
    """A move's last catch up lifts the target's mark; its erasures applied again there then
    rename an erased visitor's click the source still held raw (a batch beside the one that
    taught the ledger stored it, and the fence came before the source's sweep). Killed after
    that, the move run again copied a second time: the source's raw visitor was not there
    to copy over, so its copy deleted the renamed one and left the click renamed, with no
    unique visitor and its count (the generative test's seed 465957242). The run taken up
    goes on to the switch without copying; ``--abort`` is refused from then on."""
    from ingest.contract import erasure as ledger
    from ingest.contract.events import Dialect, Envelope, EventType
    from ingest.privacy import erasure as pg_erasure
    from workers.consumer import store

    directory_url, shard_url = two_shards
    s = settings.model_copy(update={"database_url": directory_url})
    procs = Procs(s, tmp_path)
    ws = (await _setup(procs, shard_url, code="latecode"))["workspace_id"]
    on_source = await create_pg_pool(s, min_size=1, max_size=2)
    source, target = await asyncpg.connect(directory_url), await asyncpg.connect(shard_url)
    ledger.forget_salt()
    try:
        click = Envelope(
            EventType.CLICK,
            Dialect.BIORE,
            {"code": "latecode", "visitor_id": "v-late"},
            ws,
            "198.51.100.7",
            "Mozilla/5.0",
        )
        signed = Envelope(
            EventType.LEAD, Dialect.REFPORT, {"code": "latecode", "external_id": "cus_late", "name": "Sign Up"}, ws
        )
        assert (await store.write_batch(on_source, [click, signed])).inserted == 2
        await pg_erasure.erase(on_source, ws, "cus_late", by="test", archive_days=30)
        # their late lead names the visitor: the ledger learns it, as a worker meeting it
        # does; the click stays raw, as one a batch beside it stored does, for the sweep
        late = Envelope(EventType.LEAD, Dialect.REFPORT, {"visitor_id": "v-late", "external_id": "cus_late"}, ws)
        key = await ledger.salt(source)
        assert await ledger.learn(source, key, [(late, ws)])
        assert await source.fetchval("SELECT visitor_id FROM events WHERE event_id = $1", click.event_id) == "v-late"

        mover = Mover(UUID(ws), source, target)
        _, since = await mover.copy(None)
        _, since = await mover.copy(since)
        await mover.fence("b")
        await mover.finish(since)  # the first run: its erasures again rename the click on the target
        renamed = await target.fetchval("SELECT visitor_id FROM events WHERE event_id = $1", click.event_id)
        assert ledger.is_pseudonym(renamed), renamed
        off = [
            dict(r)
            for r in await target.fetch(_VISITS_OFF, ws)
            if len({r["unique_clicks"], r["rows"], r["clicked"]}) > 1
        ]
        assert off == []
        again = Mover(UUID(ws), source, target)  # killed there, and run again
        await again.fence("b")
        copied = await again.finish(since)
        assert await target.fetchval("SELECT visitor_id FROM events WHERE event_id = $1", click.event_id) == renamed
        off = [
            dict(r)
            for r in await target.fetch(_VISITS_OFF, ws)
            if len({r["unique_clicks"], r["rows"], r["clicked"]}) > 1
        ]
        assert off == [], off
        assert copied == 0
        assert await target.fetchval("SELECT count(*) FROM link_visitor_days WHERE visitor_key = $1", "v-late") == 0
    finally:
        ledger.forget_salt()
        await source.close()
        await target.close()
        await on_source.close()
        procs.stop_all()


async def test_a_catch_up_writes_a_unique_value_that_passed_from_one_row_to_another(
    settings: Settings, tmp_path: Any, two_shards: tuple[str, str], monkeypatch: Any
) -> None:
    """A customer's visitor (unique in its workspace) passed from one row to another between
    two copies: the old customer renamed (an erasure's pseudonym), a new one made on the
    same visitor. The catch up inserted the new row while the target's old one still held
    the visitor, or wrote it in an earlier chunk, and every run of the move failed on
    ``customers_visitor`` (the generative test's seed 1848841839). A chunk of one row here."""
    from workers.ops import move

    async with _two_copies(settings, tmp_path, two_shards) as (ws, source, target):
        monkeypatch.setattr(move, "CHUNK", 1)
        old = await source.fetchval(
            "INSERT INTO customers (workspace_id, visitor_id, first_seen_at, last_seen_at)"
            " VALUES ($1, 'v-passing', now(), now()) RETURNING id",
            ws["workspace_id"],
        )
        mover = Mover(UUID(ws["workspace_id"]), source, target)
        _, since = await mover.copy(None)
        # the old one renamed, then a new row on its visitor (first in the key's order)
        await source.execute("UPDATE customers SET visitor_id = 'v-renamed' WHERE id = $1", old)
        await source.execute(
            "INSERT INTO customers (id, workspace_id, visitor_id, external_id, first_seen_at, last_seen_at)"
            " VALUES ('00000000-0000-7000-8000-000000000001', $1, 'v-passing', 'cust-new', now(), now())",
            ws["workspace_id"],
        )
        _, since = await mover.copy(since)
        await mover.finish(since)
        assert await _rows(target, ws["workspace_id"]) == await _rows(source, ws["workspace_id"])


@pytest.mark.parametrize("order", ["giver-first", "taker-first"])
async def test_a_catch_up_writes_a_unique_value_passed_between_two_rows_the_target_holds(
    settings: Settings, tmp_path: Any, two_shards: tuple[str, str], order: str
) -> None:
    """As above, with both rows on the target already, in either order on the source: one
    UPDATE may meet the taker before the giver (its plan decides), and the rows are then
    written one at a time, the giver's first. A cycle of values (two rows that swapped
    theirs) is refused by name, the move left to be run again."""
    async with _two_copies(settings, tmp_path, two_shards) as (ws, source, target):
        add = (
            "INSERT INTO customers (workspace_id, visitor_id, first_seen_at, last_seen_at)"
            " VALUES ($1, $2, now(), now()) RETURNING id"
        )
        giver = await source.fetchval(add, ws["workspace_id"], "v-given")
        taker = await source.fetchval(add, ws["workspace_id"], "v-taker")
        swapped = [await source.fetchval(add, ws["workspace_id"], v) for v in ("v-one", "v-two")]
        mover = Mover(UUID(ws["workspace_id"]), source, target)
        _, since = await mover.copy(None)
        rename = "UPDATE customers SET visitor_id = $2 WHERE id = $1"
        await source.execute(rename, giver, "v-renamed")
        await source.execute(rename, taker, "v-given")
        if order == "taker-first":  # the giver's row version after the taker's
            await source.execute("UPDATE customers SET last_seen_at = now() WHERE id = $1", giver)
        _, since = await mover.copy(since)
        assert await _rows(target, ws["workspace_id"]) == await _rows(source, ws["workspace_id"])

        await source.execute(rename, swapped[0], "v-swapping")
        await source.execute(rename, swapped[1], "v-one")
        await source.execute(rename, swapped[0], "v-two")
        with pytest.raises(MoveError, match="customers: 2 rows hold each other's unique values"):
            await mover.copy(since)


async def test_a_first_copy_taken_up_again_forgets_what_its_first_run_copied_and_the_source_deleted(
    settings: Settings, tmp_path: Any, two_shards: tuple[str, str]
) -> None:
    """A move killed in its first copy, before it recorded where the copy stood, starts
    that copy again over what the first run wrote. A customer deleted on the source since,
    whose visitor a new customer took, met the new row on ``customers_visitor`` on every
    run; the rows the source no longer holds are now deleted there first."""
    async with _two_copies(settings, tmp_path, two_shards) as (ws, source, target):
        gone = await source.fetchval(
            "INSERT INTO customers (workspace_id, visitor_id, first_seen_at, last_seen_at)"
            " VALUES ($1, 'v-reused', now(), now()) RETURNING id",
            ws["workspace_id"],
        )
        await Mover(UUID(ws["workspace_id"]), source, target).copy(None)  # the run that was killed
        await source.execute("DELETE FROM customers WHERE id = $1", gone)
        await source.execute(
            "INSERT INTO customers (workspace_id, visitor_id, first_seen_at, last_seen_at)"
            " VALUES ($1, 'v-reused', now(), now())",
            ws["workspace_id"],
        )
        mover = Mover(UUID(ws["workspace_id"]), source, target)
        _, since = await mover.copy(None)
        await mover.finish(since)
        assert await _rows(target, ws["workspace_id"]) == await _rows(source, ws["workspace_id"])
