"""The bounds of client JSON (``ingest.contract.bounds``), at every door and behind them.

orjson parses 1024 levels and writes 255: a document nested between the two was answered
500 by the routes that write it again before they answer (the stream entry, an idempotency
key's fingerprint), or answered 200 and then crashed the worker that wrote its rows. Here:
each route answers a document past the bound with its own 400, one at the bound is stored
end to end, the import refuses the row by its line, and an entry past the bound that is
already in a stream (an older edge, a replay) is dead-lettered as its own bytes while its
neighbours are stored, the worker never crashing.
"""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any

import asyncpg
import orjson
import pytest

from ingest.contract import wire
from ingest.contract.bounds import MAX_DEPTH, MAX_VALUES, BoundsError, check
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.keys import GROUP, Keys
from ingest.contract.wire import FIELD, FIELDS, PACKED
from workers.ops import dead, import_formats
from workers.ops.import_lines import Line

from ._entries import v2_of, v3_with
from ._procs import Procs
from ._world import World, call
from .conftest import wait_for
from .test_seed_004_refport import lead_body, new_click

DEEP = 300  # past orjson's 255 (what it writes), within its 1024 (what it parses)


def nested(levels: int) -> bytes:
    """JSON text of an object ``levels`` deep: ``{"x":1}`` is 1, ``{"x":{"x":1}}`` is 2."""
    return b'{"x":' * (levels - 1) + b'{"x":1}' + b"}" * (levels - 1)


def with_metadata(body: dict[str, Any], levels: int) -> bytes:
    """``body`` with a ``metadata`` that makes the whole body ``levels`` deep."""
    return orjson.dumps(body)[:-1] + b',"metadata":' + nested(levels - 1) + b"}"


def bearer(world: World, **more: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {world.api_key}", **more}


SALE = {"customerExternalId": "user_001", "amount": 4900, "currency": "usd", "invoiceId": "in_deep"}
CONVERSION = {"customer_id": "user_001", "amount": 4900, "currency": "usd", "invoice_id": "in_deep2"}


async def _lead(edge: str) -> dict[str, Any]:
    body = lead_body(await new_click(edge))
    del body["metadata"]
    return body


def _batch(item: bytes) -> bytes:
    return b"[" + item + b"]"


def test_the_bound_counts_levels_of_containers():
    check(orjson.loads(nested(MAX_DEPTH)))
    check([[]] * 3)
    with pytest.raises(BoundsError, match=f"deeper than {MAX_DEPTH}"):
        check(orjson.loads(nested(MAX_DEPTH + 1)))
    with pytest.raises(BoundsError, match=f"deeper than {MAX_DEPTH}"):
        check(orjson.loads(b"[" * 1000 + b"]" * 1000))  # no recursion: as deep as orjson parses
    with pytest.raises(BoundsError, match=f"more than {MAX_VALUES}"):
        check({"m": [0] * MAX_VALUES})  # the object's one member and the list's own


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, DEEP])
async def test_deep_metadata_is_each_routes_400_and_nothing_is_stored(
    edge: str, world: World, pg: asyncpg.Pool, drain, levels: int
):
    lead = await _lead(edge)
    status, out, _ = await call(
        "POST", f"{edge}/api/track/lead", data=with_metadata(lead, levels), headers=bearer(world)
    )
    assert status == 400 and out["error"]["code"] == "VALIDATION_ERROR", (status, out)
    assert f"deeper than {MAX_DEPTH} levels" in out["error"]["message"]

    status, out, _ = await call(
        "POST", f"{edge}/api/track/sale", data=with_metadata(SALE, levels), headers=bearer(world)
    )
    assert status == 400 and out["error"]["code"] == "VALIDATION_ERROR", (status, out)

    status, out, _ = await call(
        "POST", f"{edge}/v1/track/conversion", data=with_metadata(CONVERSION, levels), headers=bearer(world)
    )
    assert status == 400 and out["error"] == "invalid_json" and f"deeper than {MAX_DEPTH}" in out["detail"]

    # the batch: each item is a document like a body; one past the bound refuses the request
    item = with_metadata({"type": "lead", **lead}, levels)
    status, out, _ = await call("POST", f"{edge}/v1/events/batch", data=_batch(item), headers=bearer(world))
    assert status == 400 and out["error"] == "invalid_json" and out["detail"].startswith("events[0]: "), out
    ndjson = {"Content-Type": "application/x-ndjson", **bearer(world)}
    status, out, _ = await call("POST", f"{edge}/v1/events/batch", data=b"{}\n" + item, headers=ndjson)
    assert status == 400 and out["detail"].startswith("events[1]: "), out

    # a route without metadata, and the management API: the body as a whole is bounded
    body = orjson.dumps({"affiliate_url": "https://x.example/?aff=PARTNER123"})[:-1] + b',"extra":'
    status, out, _ = await call("POST", f"{edge}/api/v1/track/click", data=body + nested(levels - 1) + b"}")
    assert status == 400 and out["success"] is False and f"deeper than {MAX_DEPTH}" in out["error"], out
    status, out, _ = await call(
        "POST", f"{edge}/v1/programs", data=with_metadata({"name": "P"}, levels), headers=bearer(world)
    )
    assert status == 400 and out["error"] == "invalid_request", out

    await drain()
    assert await pg.fetchval("SELECT count(*) FROM events WHERE type <> 1") == 0
    assert await pg.fetchval("SELECT count(*) FROM sales") == 0


async def test_a_keyed_request_with_deep_metadata_is_400_not_500(edge: str, world: World):
    """An ``Idempotency-Key`` makes the route fingerprint what was asked: that must not be
    where a deep document fails."""
    lead = await _lead(edge)
    keyed = bearer(world, **{"Idempotency-Key": "deep-1"})
    status, out, _ = await call("POST", f"{edge}/api/track/lead", data=with_metadata(lead, DEEP), headers=keyed)
    assert status == 400 and out["error"]["code"] == "VALIDATION_ERROR", (status, out)
    status, out, _ = await call("POST", f"{edge}/api/track/sale", data=with_metadata(SALE, DEEP), headers=keyed)
    assert status == 400 and out["error"]["code"] == "VALIDATION_ERROR", (status, out)
    status, out, _ = await call(
        "POST", f"{edge}/v1/track/conversion", data=with_metadata(CONVERSION, DEEP), headers=keyed
    )
    assert status == 400 and out["error"] == "invalid_json", (status, out)
    item = with_metadata({"type": "lead", "idempotency_key": "deep-item", **lead}, DEEP)
    status, out, _ = await call("POST", f"{edge}/v1/events/batch", data=_batch(item), headers=keyed)
    assert status == 400 and out["error"] == "invalid_json", (status, out)
    # the management API fingerprints the body before its handler parses it
    status, out, _ = await call("POST", f"{edge}/v1/programs", data=with_metadata({"name": "P"}, DEEP), headers=keyed)
    assert status == 400 and out["error"] == "invalid_request", (status, out)


async def test_metadata_at_the_bound_is_accepted_and_stored_end_to_end(
    edge: str, world: World, pg: asyncpg.Pool, redis, keys: Keys, drain
):
    lead = await _lead(edge)
    status, out, _ = await call(
        "POST", f"{edge}/api/track/lead", data=with_metadata(lead, MAX_DEPTH), headers=bearer(world)
    )
    assert status == 200, out
    status, out, _ = await call(
        "POST",
        f"{edge}/api/track/sale",
        data=with_metadata(SALE, MAX_DEPTH),
        headers=bearer(world, **{"Idempotency-Key": "at-bound"}),
    )
    assert status == 200, out
    status, out, _ = await call(
        "POST", f"{edge}/v1/track/conversion", data=with_metadata(CONVERSION, MAX_DEPTH), headers=bearer(world)
    )
    assert status == 200, out
    item = with_metadata({"type": "sale", **SALE, "invoiceId": "in_batch"}, MAX_DEPTH)
    status, out, _ = await call("POST", f"{edge}/v1/events/batch", data=_batch(item), headers=bearer(world))
    assert status == 200 and out["accepted"] == 1, out

    totals = await drain()
    assert totals["dead"] == 0 and await redis.xlen(keys.dead) == 0
    assert await pg.fetchval("SELECT count(*) FROM events WHERE type = 2") == 1
    want = orjson.loads(nested(MAX_DEPTH - 1))  # the body is one level, its metadata the rest
    stored = await pg.fetch("SELECT invoice_id, metadata FROM sales ORDER BY invoice_id")
    assert [r["invoice_id"] for r in stored] == ["in_batch", "in_deep", "in_deep2"]
    assert all((m if isinstance(m := r["metadata"], dict) else orjson.loads(m)) == want for r in stored)


def test_the_import_refuses_a_row_past_the_bound_by_its_line():
    ok = orjson.dumps(
        {"type": "lead", "id": "l1", "timestamp": 1_700_000_000_000, "customer_id": "c1", "link": "PARTNER123"}
    )
    deep = with_metadata(orjson.loads(ok), MAX_DEPTH + 1)
    at_bound = with_metadata({**orjson.loads(ok), "id": "l2"}, MAX_DEPTH)
    texts = [ok.decode(), deep.decode(), with_metadata(orjson.loads(ok), DEEP).decode(), at_bound.decode()]
    rows = list(import_formats.ndjson(Line(i, t) for i, t in enumerate(texts, 1)))
    assert [type(r).__name__ for r in rows] == ["Row", "Bad", "Bad", "Row"]
    assert [(r.line, r.reason) for r in rows if isinstance(r, import_formats.Bad)] == [(2, "invalid"), (3, "invalid")]
    assert all(f"deeper than {MAX_DEPTH}" in r.detail for r in rows if isinstance(r, import_formats.Bad))
    # CSV: metadata is JSON text in its cell (the row is one level, its metadata the rest)
    cell = nested(MAX_DEPTH).decode().replace('"', '""')
    csv = ["type,id,timestamp,customer_id,link,metadata", f'lead,l3,1700000000000,c1,PARTNER123,"{cell}"']
    (bad,) = import_formats.csv_rows(Line(i, t) for i, t in enumerate(csv, 1))
    assert isinstance(bad, import_formats.Bad) and bad.line == 2 and f"deeper than {MAX_DEPTH}" in bad.detail


def _click(world: World) -> Envelope:
    return Envelope(EventType.CLICK, Dialect.BIORE, {"code": "PARTNER123"}, world.workspace_id, "203.0.113.7", "ua")


async def test_an_entry_too_deep_in_its_stream_is_dead_lettered_as_its_bytes_and_never_crashes_the_worker(
    procs: Procs, world: World, pg: asyncpg.Pool, redis, keys: Keys
):
    """Entries an older edge, an import or a replay of the archive wrote, past the bound:
    version 3, 2 and 1, deeper than orjson writes and just past the bound. Each is
    dead-lettered with the fields it had in its stream, byte for byte, and acked; the
    clicks around them in the same read are stored; the worker (``refstream work``, as
    deployed) never logs ``consumer.crashed``."""
    stream = keys.stream_for("PARTNER123")
    deep = b'{"c":"PARTNER123","M":' + nested(DEEP) + b"}"
    past = b'{"c":"PARTNER123","M":' + nested(MAX_DEPTH) + b"}"
    blob = wire.to_blob(_click(world))  # version 1: [1, id, type, ws, at, ip, ua, dialect, payload]
    deep_v1 = {FIELD: blob[: blob.rindex(b"}")] + b',"metadata":' + nested(DEEP) + b"}]"}
    planted = [v3_with(_click(world), deep), v3_with(_click(world), past), v2_of(_click(world), deep), deep_v1]
    ids = [await redis.xadd(stream, wire.to_entry_dict(_click(world)))]
    for fields in planted:
        ids.append(await redis.xadd(stream, fields))
        ids.append(await redis.xadd(stream, wire.to_entry_dict(_click(world))))
    dead_ids = ids[1::2]

    as_read = {entry_id: fields for entry_id, fields in await redis.xrange(stream)}
    worker = procs.start("work", REFSTREAM_CONSUMER_NAME="bounds")
    try:

        async def settled() -> bool:
            if worker.poll() is not None:
                raise AssertionError(f"the worker exited with {worker.returncode}: {procs.logs()}")
            stored: int = await pg.fetchval("SELECT count(*) FROM events")
            return stored == 5 and await redis.xlen(keys.dead) == 4

        await wait_for(settled, timeout=60, what="the clicks stored and the deep entries dead-lettered")
        await wait_for(lambda: _acked(redis, stream), timeout=30, what="every entry acked")
    finally:
        worker.terminate()
        await asyncio.to_thread(_reap, worker)
    assert "consumer.crashed" not in procs.logs() and "Recursion limit" not in procs.logs()

    letters = {fields[b"id"]: fields for _, fields in await redis.xrange(keys.dead)}
    assert set(letters) == set(dead_ids)
    for entry_id in dead_ids:
        letter, fields = letters[entry_id], as_read[entry_id]
        assert letter[b"error"].startswith(b"decode: JSON nested deeper than 32 levels"), letter[b"error"]
        assert letter[b"stream"] == stream.encode()
        assert {k: v for k, v in letter.items() if k in (PACKED, FIELD, *FIELDS)} == fields  # the bytes as read
    assert await pg.fetchval("SELECT clicks FROM links WHERE code = 'PARTNER123'") == 5
    # an operator's view shows them as bytes (a terminal, orjson: both can write it), and a
    # requeue leaves them where they are: the worker would set them aside again at once
    shown = [letter.detail() async for letter in dead.scan(redis, keys)]
    assert all(d["envelope"] is None and "deeper than" in d["decode_error"] for d in shown)
    orjson.dumps(shown)
    out = await dead.requeue(redis, keys)
    assert (out.done, out.skipped) == (0, {"undecodable": 4})


async def _acked(redis: Any, stream: str) -> bool:
    pending: int = (await redis.xpending(stream, GROUP))["pending"]
    return pending == 0


def _reap(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


async def test_a_replay_counts_an_entry_past_the_bound_as_undecodable_and_stores_the_rest(
    procs: Procs, world: World, pg: asyncpg.Pool, redis, keys: Keys
):
    """A replay stores straight into Postgres: it keeps the bound the workers keep, so it
    never stores what they dead-letter, nor fails on what orjson cannot write."""
    stream = keys.stream_for("PARTNER123")
    for levels in (DEEP, MAX_DEPTH):
        await redis.xadd(stream, wire.to_entry_dict(_click(world)))
        await redis.xadd(stream, v3_with(_click(world), b'{"c":"PARTNER123","M":' + nested(levels) + b"}"))
    done = await procs.cli("replay", "--since", "1h", "--json")
    totals = done["totals"]
    assert (totals["entries"], totals["inserted"], totals["undecodable"], totals["failed"]) == (4, 2, 2, 0), totals
    assert await pg.fetchval("SELECT count(*) FROM events") == 2
