"""An append that Redis stalls on, against a Redis and edges of the test's own: Redis is
stopped (SIGSTOP) with the append in its socket, so the edge gives up on it (its deadline)
without knowing whether it ran, and Redis runs it when it resumes (the kernel keeps taking
bytes for a stopped process). Whatever the edge answered: a 2xx is stored exactly once (the
spooled copy and the stream's share an event id, or a key's check), a refusal never, and a
"may be stored" 503 is stored at most once, once again when retried with its key."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import pytest
from aiohttp import web

from ingest.contract.settings import Settings
from ingest.edge.lookup import CHECKED_APPEND
from ingest.edge.scripts import standalone
from ingest.edge.state import EDGE
from ingest.link.once import APPEND_ONCE
from ingest.spool import store as spool_store
from refstream.embedded import free_port
from workers.host.worker import drain as drain_streams

from ._world import World, call, start_edge
from .conftest import wait_for
from .faults._servers import FaultRedis
from .test_refusals import EVENT_ID, FULL, OUTCOME, affixo, full_spool, own, stored

# a Redis of its own, stopped and resumed: the same whichever servers the suite uses
pytestmark = pytest.mark.once

XADD = b"$4\r\nXADD\r\n"  # the command's name as RESP sends it
APPEND_ONCE_SHA = hashlib.sha1(standalone(APPEND_ONCE).encode()).hexdigest().encode()
# a keyed append on one Redis runs in the merged script of its round trip, after its record's
# filing (``ingest.edge.scripts``): its call names the key's record
KEYED = b":idk:{"
CHECKED_SHA = hashlib.sha1(standalone(CHECKED_APPEND).encode()).hexdigest().encode()


class Stall:
    """A TCP proxy in front of ``server``: once armed, the first chunk a client sends that
    appends an event (an XADD, or a script that appends one) stops Redis (SIGSTOP, and
    waits until the kernel says it is stopped) before it is forwarded: Redis holds the
    command, unexecuted, until ``resume``."""

    def __init__(self, server: FaultRedis) -> None:
        self.server = server
        self.port = free_port()
        self.armed = False
        self.matched: bytes | None = None  # which append stopped Redis
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.server.proc is not None
        return self.server.proc.pid

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    def arm(self) -> None:
        self.armed, self.matched = True, None

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.server.port)
        except OSError:
            writer.close()
            return
        for pipe in (self._pipe(reader, up_w, up=True), self._pipe(up_r, writer, up=False)):
            task = asyncio.create_task(pipe)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, up: bool) -> None:
        try:
            while data := await src.read(65536):
                if up and self.armed:
                    self.matched = next((m for m in (XADD, APPEND_ONCE_SHA, KEYED, CHECKED_SHA) if m in data), None)
                    if self.matched is not None:
                        self.armed = False
                        await self._stop()
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            dst.close()

    async def _stop(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

        async def stopped() -> bool:
            return _state(self.pid) == "T"

        await wait_for(stopped, timeout=5, what="Redis to stop")

    async def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.resume()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


async def stalled(stall: Stall, runner: web.AppRunner, send: Awaitable[Any]) -> Any:
    """``send`` with Redis stopped on its append; Redis resumed once it is answered, then
    the edge back on Redis (its breaker closed again) and its spool drained (what it could)."""
    edge = runner.app[EDGE]
    spool = Path(edge.settings.spool_dir)
    held = spool_store.usage(spool).entries  # a full spool's filler stays
    stall.arm()
    try:
        answer = await send
    finally:
        stall.resume()
    assert stall.matched is not None, ("the append never reached Redis", answer)

    async def back() -> bool:
        # any lookup is a probe while the breaker is open; its success closes it
        await call("GET", f"{_base(runner)}/api/v1/referrals/validate/PARTNER123")
        return not edge.batcher.down.open and spool_store.usage(spool).entries <= held

    await wait_for(back, timeout=30, what="the edge back on Redis, its spool drained")
    return answer


async def batch(base: str, world: World, name: str) -> tuple[int, Any, dict[str, str]]:
    """Two batch clicks: ``{name}-0`` without a key, ``{name}-1`` with its own."""
    items = [
        {"type": "click", "ref": "PARTNER123", "visitor_id": f"{name}-0"},
        {"type": "click", "ref": "PARTNER123", "visitor_id": f"{name}-1", "idempotency_key": name},
    ]
    auth = {"Authorization": f"Bearer {world.api_key}"}
    return await call("POST", f"{base}/v1/events/batch", json=items, headers=auth)


def _base(runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}"


async def test_an_append_redis_stalls_on_is_stored_once_whatever_the_answer(
    settings: Settings,
    world: World,
    pg: asyncpg.Pool,
    private_fault_redis: Callable[..., Awaitable[FaultRedis]],
    tmp_path: Path,
) -> None:
    server = await private_fault_redis()
    stall = Stall(server)
    await stall.start()
    # a short deadline: the edge gives up on the stopped Redis soon; keys cached long enough
    # for the lookup's own round trip to append (a guess) on the third request
    quick = {"redis_deadline_ms": 300, "key_cache_s": 60}
    spooling = own(settings, stall.url, tmp_path / "spool", **quick)
    full = own(settings, stall.url, tmp_path / "full", spool_max_bytes=FULL, **quick)
    runners: list[web.AppRunner] = []
    maybe: dict[str, UUID] = {}
    try:
        runner, base = await start_edge(spooling)
        runners.append(runner)
        # each path an append takes: the plain XADD, an idempotency key's script, a guess
        # appended by the lookup's script; the spool takes each, under the same event id. A
        # keyed copy's own answer is only certain where its script ran: "may be stored"
        for visitor, key, path in (
            ("plain", None, XADD),
            ("keyed", "k-1", KEYED),
            ("guess", None, CHECKED_SHA),
        ):
            status, body, headers = await stalled(stall, runner, affixo(base, world, visitor, key))
            if key is None:
                assert status == 200 and body["visitor_id"] == visitor, (status, body, headers)
            else:
                assert status == 503 and headers.get(OUTCOME) == "unknown", (status, body, headers)
                assert EVENT_ID not in headers  # the copy stored may be another's
            assert stall.matched == path, visitor
        again = await affixo(base, world, "keyed", "k-1")  # Redis ran the script when it resumed
        assert again[0] == 200 and again[2]["Idempotent-Replayed"] == "true" and again[1]["visitor_id"] == "keyed"
        # a batch's appends share one round trip: each item spooled, the keyed one "may be stored"
        status, body, _ = await stalled(stall, runner, batch(base, world, "batch"))
        assert status == 200 and [r["ok"] for r in body["results"]] == [True, False], body
        assert body["results"][1]["error"] == "outcome_unknown" and "event_id" not in body["results"][1], body

        async with full_spool(tmp_path / "full"):
            runner, base = await start_edge(full)
            runners.append(runner)
            # the spool cannot keep it: neither accepted nor refused
            for visitor, key in (("maybe-plain", None), ("maybe-keyed", "k-2")):
                status, body, headers = await stalled(stall, runner, affixo(base, world, visitor, key))
                assert status == 503 and headers.get(OUTCOME) == "unknown", (status, body, headers)
                if key is None:
                    maybe[visitor] = UUID(headers[EVENT_ID])
            status, body, _ = await stalled(stall, runner, batch(base, world, "batch-maybe"))
            assert status == 200 and [r["error"] for r in body["results"]] == ["outcome_unknown"] * 2, body
            maybe["batch-maybe-0"] = UUID(body["results"][0]["event_id"])
            replayed = await batch(base, world, "batch-maybe")  # the keyed item is replayed
            item = replayed[1]["results"][1]
            assert item["ok"] and item["visitor_id"] == "batch-maybe-1", replayed
            maybe["batch-maybe-1"] = UUID(item["event_id"])
            # the key's retry: Redis ran the first copy when it resumed, so its answer
            retry = await affixo(base, world, "maybe-keyed", "k-2")
            assert retry[0] == 200 and retry[2]["Idempotent-Replayed"] == "true", retry
            assert retry[1]["visitor_id"] == "maybe-keyed"
    finally:
        for runner in runners:
            await runner.cleanup()
        await stall.close()
    await drain_streams(own(settings, server.url, tmp_path / "spool"))
    assert await stored(pg) == Counter(["plain", "keyed", "guess", "maybe-plain", "maybe-keyed"])
    native = await pg.fetch("SELECT visitor_id FROM events WHERE dialect = 'native'")
    # batch-maybe-0 is stored once though the batch was sent twice: Redis ran the first copy,
    # and the second (no key) is a new event, as a retry without a key is
    assert Counter(r["visitor_id"] for r in native) == Counter(
        ["batch-0", "batch-1", "batch-maybe-0", "batch-maybe-1", "batch-maybe-0"]
    )
    rows = await pg.fetch("SELECT visitor_id, event_id FROM events WHERE event_id = ANY($1)", list(maybe.values()))
    assert {r["visitor_id"]: r["event_id"] for r in rows} == maybe  # the events the 503s named
