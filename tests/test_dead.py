"""`refstream dead`: dead letters listed, shown, requeued once their cause is fixed (and
counted once however often that happens), and dropped with a reason."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ingest.contract import wire
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.keys import GROUP, Keys
from ingest.contract.wire import FIELD
from workers.ops.dead import dropped_key

from ._procs import REFSTREAM, Procs, env_for
from ._world import BROWSER


def _click(code: str) -> Envelope:
    return Envelope(
        type=EventType.CLICK, dialect=Dialect.BIORE, payload={"code": code}, ip="203.0.113.7", user_agent=BROWSER
    )


async def _letter(redis, keys: Keys, raw: bytes, *, stream: str | None, error: str = "store: boom") -> str:
    """A dead letter with the fields the pipeline writes."""
    fields = {"id": "1-1", "error": error, "deliveries": 1, "at": int(time.time() * 1000), FIELD: raw}
    if stream is not None:
        fields["stream"] = stream
    entry_id: bytes = await redis.xadd(keys.dead, fields)
    return entry_id.decode()


async def test_a_requeued_dead_letter_is_counted_once(procs: Procs, pg, redis, keys: Keys):
    ws = await procs.cli("workspace", "create", "Acme")
    await procs.cli("link", "create", "--workspace", ws["workspace_id"], "--code", "alice")
    event = _click("later")
    await _letter(redis, keys, wire.to_blob(event), stream=keys.stream_for("later"), error="store: link not there yet")
    # a second one without its stream recorded: routed by its code; and an earlier requeue
    # that crashed between XADD and XDEL: the same event on the stream already
    twin = _click("later")
    await _letter(redis, keys, wire.to_blob(twin), stream=None)
    await redis.xadd(keys.stream_for("later"), {FIELD: wire.to_blob(twin)})

    await procs.cli("link", "create", "--workspace", ws["workspace_id"], "--code", "later")
    assert await procs.cli("dead", "requeue", "--json", "--all") == {
        "matched": 2,
        "requeued": 2,
        "missing": 0,
        "skipped": {},
    }
    assert await redis.xlen(keys.dead) == 0
    await procs.cli("work", "--drain")
    assert (await procs.cli("link", "show", "later"))["clicks"] == 2

    assert await procs.cli("dead", "requeue", "--json", "--all") == {
        "matched": 0,
        "requeued": 0,
        "missing": 0,
        "skipped": {},
    }
    # re-delivering the very same envelopes (a replay) counts nothing either
    for e in (event, twin):
        await redis.xadd(keys.stream_for("later"), {FIELD: wire.to_blob(e)})
    await procs.cli("work", "--drain")
    assert (await procs.cli("link", "show", "later"))["clicks"] == 2
    assert (await procs.cli("link", "show", "alice"))["clicks"] == 0
    assert (await redis.xpending(keys.stream_for("later"), GROUP))["pending"] == 0


async def test_requeue_by_id_and_filters_is_idempotent(procs: Procs, pg, redis, keys: Keys):
    ea = _click("a")
    a = await _letter(redis, keys, wire.to_blob(ea), stream=keys.streams[0], error="store: X")
    b = await _letter(redis, keys, wire.to_blob(_click("b")), stream=keys.streams[1], error="store: Y")
    junk = await _letter(redis, keys, b"\xff\x00junk", stream=keys.streams[1], error="decode: not JSON")

    assert (await procs.cli("dead", "requeue", "--json", a))["requeued"] == 1
    assert await procs.cli("dead", "requeue", "--json", a) == {"matched": 0, "requeued": 0, "missing": 1, "skipped": {}}
    assert [f[FIELD] for _, f in await redis.xrange(keys.streams[0])] == [wire.to_blob(ea)]
    out = await procs.cli("dead", "requeue", "--json", "--stream", "1")
    assert out == {"matched": 2, "requeued": 1, "missing": 0, "skipped": {"undecodable": 1}}
    assert [i.decode() for i, _ in await redis.xrange(keys.dead)] == [junk]
    assert (await procs.cli("dead", "requeue", "--json", "--code", "b"))["matched"] == 0

    # exactly one selector
    for args in ((), (b, "--all"), ("--all", "--code", "a")):
        assert await _exit_code(procs, "dead", "requeue", *args) == 2
    assert await _exit_code(procs, "dead", "requeue", "not-an-id") == 1


async def test_drop_records_the_reason_and_list_and_show_describe_letters(procs: Procs, pg, redis, keys: Keys):
    event = _click("gone")
    good = await _letter(redis, keys, wire.to_blob(event), stream=keys.stream_for("gone"), error="store: refused")
    junk = await _letter(redis, keys, b"\x1b[31m\xff not an envelope", stream=keys.streams[0], error="decode: bad")

    rows = await procs.cli("dead", "list", "--json")
    assert [r["dead_id"] for r in rows] == [good, junk]
    assert rows[0] | {"at_ms": 0} == {
        "dead_id": good,
        "stream": keys.stream_for("gone"),
        "entry_id": "1-1",
        "error": "store: refused",
        "deliveries": 1,
        "at_ms": 0,
        "event_id": event.event_id.hex,
        "type": "click",
        "dialect": "biore",
        "code": "gone",
    }
    assert rows[1]["event_id"] is None and rows[1]["code"] is None
    assert len(await procs.cli("dead", "list", "--json", "--limit", "1")) == 1

    shown = await procs.cli("dead", "show", "--json", good)
    assert shown["envelope"]["payload"] == {"code": "gone"} and shown["raw"] is None
    shown = await procs.cli("dead", "show", "--json", junk)
    assert shown["envelope"] is None and shown["decode_error"]
    assert shown["raw"] == "\x1b[31m\\xff not an envelope" and shown["raw_bytes"] == 22
    assert await _exit_code(procs, "dead", "show", "1-0") == 1

    assert await _exit_code(procs, "dead", "drop", "--all") == 2  # a reason is required
    out = await procs.cli("dead", "drop", "--json", "--error-contains", "decode:", "--reason", "garbage from a fuzzer")
    assert out == {"matched": 1, "dropped": 1, "missing": 0, "to": dropped_key(keys)}
    assert await procs.cli("dead", "drop", "--json", junk, "--reason", "again") == {
        "matched": 0,
        "dropped": 0,
        "missing": 1,
        "to": dropped_key(keys),
    }
    ((_, dropped),) = await redis.xrange(dropped_key(keys))
    assert dropped[b"reason"] == b"garbage from a fuzzer" and dropped[b"dead_id"] == junk.encode()
    assert dropped[FIELD] == b"\x1b[31m\xff not an envelope" and dropped[b"error"] == b"decode: bad"
    assert int(dropped[b"dropped_at"]) > 0
    assert [r["dead_id"] for r in await procs.cli("dead", "list", "--json")] == [good]

    table = await _output(procs, "dead", "list")
    assert good in table and "store: refused" in table


async def _exit_code(procs: Procs, *args: str) -> int:
    proc = await asyncio.create_subprocess_exec(
        REFSTREAM, *args, env=env_for(procs.settings), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode


async def _output(procs: Procs, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        REFSTREAM,
        *args,
        env=env_for(procs.settings, COLUMNS="300"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    return out.decode()


async def test_a_version_2_letter_is_shown_and_requeued_verbatim(procs: Procs, pg, redis, keys: Keys):
    """A letter holding a version-2 entry's fields (beside one holding version 1's ``e``):
    decoded for `dead show`, appended back as the same fields, stored by the worker."""
    ws = await procs.cli("workspace", "create", "Acme")
    await procs.cli("link", "create", "--workspace", ws["workspace_id"], "--code", "later")
    event = _click("later")
    fields: dict[str, str | int] = {
        "stream": keys.stream_for("later"),
        "id": "1-1",
        "error": "store: boom",
        "deliveries": 1,
        "at": 1,
    }
    # str and bytes names, as xadd takes them
    letter: dict[Any, str | bytes | int] = {**fields, **wire.to_entry_dict(event)}
    dead_id = (await redis.xadd(keys.dead, letter)).decode()
    shown = await procs.cli("dead", "show", dead_id)
    assert shown["envelope"]["event_id"] == event.event_id.hex and shown["envelope"]["user_agent"] == BROWSER
    assert shown["other_fields"] == {} and shown["code"] == "later"
    assert (await procs.cli("dead", "requeue", "--all"))["requeued"] == 1
    [(_, appended)] = await redis.xrange(keys.stream_for("later"))
    assert appended == {k: str(v).encode() if isinstance(v, int) else v for k, v in wire.to_entry_dict(event).items()}
    await procs.cli("work", "--drain")
    assert (await procs.cli("link", "show", "later"))["clicks"] == 1
