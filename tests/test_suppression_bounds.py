"""The do-not-track lists have a bound, and no edge holds every workspace's copy (issue 64,
7): a workspace lists at most ``REFSTREAM_SUPPRESSION_MAX`` entries (a POST past it is the
management API's 409 in its own shape); the listing comes in pages; an edge keeps a
fingerprint filter of the lists (8 bytes an entry, not the rows) and its refresh reads
what changed since its last read, never every list again."""

from __future__ import annotations

import tracemalloc
import uuid
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from ingest.contract import suppression
from ingest.contract.events import Envelope, EventType
from ingest.contract.settings import Settings
from ingest.manage import admin, suppressions
from ingest.privacy.suppressed import Suppressed

from ._world import World, call, start_edge


def _auth(world: World) -> dict[str, str]:
    return {"Authorization": f"Bearer {world.api_key}"}


async def test_a_workspace_lists_at_most_its_cap_and_a_post_past_it_is_refused_in_the_apis_shape(
    settings: Settings, world: World, pg: asyncpg.Pool
) -> None:
    runner, edge = await start_edge(settings.model_copy(update={"suppression_max": 3}))
    auth = _auth(world)
    try:
        made = []
        for n in range(3):
            status, out, _ = await call(
                "POST", f"{edge}/v1/suppressions", json={"kind": "visitor", "value": f"v-{n}"}, headers=auth
            )
            assert status == 201, out
            made.append(out["id"])
        status, out, _ = await call(
            "POST", f"{edge}/v1/suppressions", json={"kind": "visitor", "value": "v-3"}, headers=auth
        )
        assert status == 409 and out["error"] == "limit_reached" and "3" in out["detail"], (status, out)
        assert await pg.fetchval("SELECT count(*) FROM suppressions") == 3
        # one listed already is no new entry: answered as before
        status, out, _ = await call(
            "POST", f"{edge}/v1/suppressions", json={"kind": "visitor", "value": "v-0"}, headers=auth
        )
        assert (status, out["id"]) == (201, made[0])
        # the cap is each workspace's own
        async with pg.acquire() as conn:
            other = await admin.create_workspace(conn, "Other")
        status, out, _ = await call(
            "POST",
            f"{edge}/v1/suppressions",
            json={"kind": "ip", "value": "10.0.0.1"},
            headers={"Authorization": f"Bearer {other['api_key']}"},
        )
        assert status == 201, out
        # one taken off makes room
        assert (await call("DELETE", f"{edge}/v1/suppressions/{made[1]}", headers=auth))[0] == 204
        status, out, _ = await call(
            "POST", f"{edge}/v1/suppressions", json={"kind": "visitor", "value": "v-3"}, headers=auth
        )
        assert status == 201, out
    finally:
        await runner.cleanup()


async def test_the_listing_comes_in_pages(edge: str, world: World) -> None:
    auth = _auth(world)
    made = set()
    for n in range(7):
        status, out, _ = await call(
            "POST", f"{edge}/v1/suppressions", json={"kind": "customer", "value": f"c-{n}"}, headers=auth
        )
        assert status == 201
        made.add(out["id"])
    seen: list[str] = []
    sizes = []
    url = f"{edge}/v1/suppressions?limit=3"
    while True:
        status, page, _ = await call("GET", url, headers=auth)
        assert status == 200, page
        sizes.append(len(page["data"]))
        seen += [e["id"] for e in page["data"]]
        if page["next"] is None:
            break
        url = f"{edge}/v1/suppressions?limit=3&before={page['next']}"
    assert sizes == [3, 3, 1] and len(seen) == 7 and set(seen) == made
    status, page, _ = await call("GET", f"{edge}/v1/suppressions", headers=auth)
    assert status == 200 and len(page["data"]) == 7 and page["next"] is None
    for bad in ("limit=0", "limit=501", "limit=x", "before=nope"):
        status, out, _ = await call("GET", f"{edge}/v1/suppressions?{bad}", headers=auth)
        assert status == 400 and out["error"] == "invalid_request", (bad, status, out)


class _Counting:
    """A pool whose connections count the bytes of every value they hand back."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool, self.bytes = pool, 0

    def _count(self, value: Any) -> None:
        if isinstance(value, (bytes, str)):
            self.bytes += len(value)
        elif isinstance(value, asyncpg.Record):
            for v in value.values():
                self._count(v)
        elif isinstance(value, list):
            for v in value:
                self._count(v)
        elif value is not None:
            self.bytes += 8

    @asynccontextmanager
    async def _acquire(self) -> Any:
        async with self.pool.acquire() as conn:
            yield _Conn(conn, self)

    def acquire(self) -> Any:
        return self._acquire()


class _Conn:
    def __init__(self, conn: asyncpg.Connection, counting: _Counting) -> None:
        self._conn, self._counting = conn, counting

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._conn, name)
        if name not in ("fetch", "fetchrow", "fetchval"):
            return found

        async def counted(*args: Any, **kwargs: Any) -> Any:
            out = await found(*args, **kwargs)
            self._counting._count(out)
            return out

        return counted


async def _many(pg: asyncpg.Pool, workspace_id: str, n: int) -> None:
    """``n`` entries in one workspace, as fast as Postgres makes them (digests of numbers)."""
    await pg.execute(
        "INSERT INTO suppressions (workspace_id, kind, digest, created_by)"
        " SELECT $1, 'visitor', decode(md5('bulk' || i), 'hex'), 'test' FROM generate_series(1, $2) i",
        workspace_id,
        n,
    )


def _click(workspace_id: str, visitor: str) -> Envelope:
    return Envelope(EventType.CLICK, "affixo", {"visitor_id": visitor}, workspace_id)


async def test_an_edges_refresh_reads_what_changed_never_every_list(world: World, pg: asyncpg.Pool) -> None:
    async with pg.acquire() as conn:
        other = (await admin.create_workspace(conn, "Long list"))["workspace_id"]
    await _many(pg, other, 20_000)
    s = Suppressed()
    await s.read(pg)  # the start: every list once
    assert len(s.lists[other]) == 20_000
    counting = _Counting(pg)
    for _ in range(3):  # nothing changed: next to nothing read
        await s.read(counting)
    assert counting.bytes < 1_000, counting.bytes

    counting.bytes = 0
    async with pg.acquire() as conn:
        added = await suppressions.add(conn, world.workspace_id, "visitor", "v-new", by="test")
    await s.read(counting)
    assert s.names(_click(world.workspace_id, "v-new")) and not s.names(_click(world.workspace_id, "v-other"))
    assert not s.names(_click(other, "v-new"))  # another workspace's list is its own
    async with pg.acquire() as conn:
        await suppressions.remove(conn, world.workspace_id, added["id"])
        await conn.execute(
            "DELETE FROM suppressions WHERE workspace_id = $1 AND digest = decode(md5('bulk7'), 'hex')", other
        )
    await s.read(counting)
    assert not s.names(_click(world.workspace_id, "v-new"))
    assert len(s.lists[other]) == 19_999
    assert counting.bytes < 1_000, counting.bytes  # two changes, a few hundred bytes: not 20,000 entries


async def test_an_edge_holds_a_long_list_in_a_few_bytes_an_entry(world: World, pg: asyncpg.Pool) -> None:
    """300,000 entries in one workspace (past the default cap, as a database could hold them):
    what an edge keeps after reading them, and the most it held while reading."""
    n = 300_000
    await _many(pg, world.workspace_id, n)
    async with pg.acquire() as conn:
        await suppressions.add(conn, world.workspace_id, "visitor", "v-listed", by="test")
    s = Suppressed()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        await s.read(pg)
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(s.lists[world.workspace_id]) == n + 1
    assert s.names(_click(world.workspace_id, "v-listed")) and not s.names(_click(world.workspace_id, "v-not"))
    kept, held = after - before, peak - before
    assert kept < 12 * n, f"{kept / n:.1f} bytes an entry kept"
    assert held < 40 * n, f"{held / n:.1f} bytes an entry held while reading"


def test_the_fingerprint_is_the_digests_first_eight_bytes() -> None:
    key = uuid.uuid4().bytes
    d = suppression.digest(key, "ws", "visitor", "v")
    assert suppression.fingerprint(d) == int.from_bytes(d[:8], "big")
