"""``refstream import`` never hangs silently and streams (docs/import.md), each as a user
meets it, through a real ``refstream import`` process against a real Redis and Postgres:

- beside a steady live load that the workers keep up with, but whose own lag is above
  ``--yield-lag-ms``, it finishes (it used to wait forever, saying nothing);
- while it gives way it says so on stderr within 5 s, with the figures it waits on; a real
  SIGINT stops it cleanly with the summary so far and the line to go on from, and a run
  from that line stores the rest, each row once;
- a malformed CSV quote, a cell over 128 KiB, a line that is not UTF-8 or longer than the
  row bound is refused with its true line (quoted newlines too) and the rows after it are
  read; a BOM is accepted; the exit code says refusals happened;
- a line with no end is refused without being read whole (the process's peak memory);
- timestamps in s, ms, µs and ns by magnitude; a sale gets the same date checks;
- a lead finds a click imported by an earlier run (the map is in Postgres, not memory).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from ingest.contract.keys import GROUP, Keys
from ingest.contract.settings import Settings

from ._procs import REFSTREAM, env_for
from ._world import World
from .conftest import wait_for
from .test_import import import_cli

EXIT_REFUSED, EXIT_STOPPED = 3, 130


def _ms(days_ago: float) -> int:
    return int((datetime.now(UTC) - timedelta(days=days_ago)).timestamp() * 1000)


def _iso(days_ago: float) -> str:
    return (datetime.now(UTC) - timedelta(days=days_ago)).isoformat()


def _clicks(code: str, n: int, first: int = 0) -> list[bytes]:
    return [
        orjson.dumps({"type": "click", "id": f"c{i}", "timestamp": _iso(2), "link": code})
        for i in range(first, first + n)
    ]


async def _steady_live_work(redis: Any, stream: str, stop: asyncio.Event, every_s: float, batch_s: float) -> int:
    """Live entries at a steady rate, read at once by a worker that keeps up: each batch it
    reads takes ``batch_s`` (the work a real batch does) before it is acknowledged, so the
    oldest live entry is always about ``batch_s`` old, and never older."""
    added = 0

    async def edge() -> None:
        nonlocal added
        while not stop.is_set():
            await redis.xadd(stream, {"i": str(added)})
            added += 1
            await asyncio.sleep(every_s)  # the live load's rate, not a synchronisation

    async def worker() -> None:
        while not stop.is_set():
            got = await redis.xreadgroup(GROUP, "live-worker", {stream: ">"}, count=100, block=20)
            if got:
                await asyncio.sleep(batch_s)  # the batch's own work
                await redis.xack(stream, GROUP, *[i for i, _ in got[0][1]])

    await asyncio.gather(edge(), worker())
    return added


async def test_a_steady_live_lag_above_the_bound_does_not_stop_the_import(
    world: World, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, tmp_path: Path
) -> None:
    """The live workers keep up, but their own batches keep the oldest entry ~80 ms old,
    above the default ``--yield-lag-ms 20``: the import measures that floor while it rests,
    waits no longer than that takes, and finishes (on the old code: nothing stored, ever)."""
    stream = keys.stream(0)
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    path = tmp_path / "clicks.ndjson"
    path.write_bytes(b"\n".join(_clicks(world.link["code"], 300)) + b"\n")
    stop = asyncio.Event()
    live = asyncio.create_task(_steady_live_work(redis, stream, stop, every_s=0.01, batch_s=0.08))
    try:
        started = time.monotonic()
        out = await import_cli(settings, path, world, "--batch-size", "50")
        took = time.monotonic() - started
    finally:
        stop.set()
        await live
    assert (out["stored"], out["refused_total"], out["finished"]) == (300, 0, True), out
    assert out["behind"] >= 1 and took < 60, (out, took)  # it did give way, and not for ever


async def _wait_line(stream: asyncio.StreamReader, has: str, within_s: float) -> str:
    async def read() -> str:
        while line := (await stream.readline()).decode():
            if has in line:
                return line
        raise AssertionError(f"stderr ended before a line with {has!r}")

    return await asyncio.wait_for(read(), within_s)


async def test_giving_way_is_said_and_ctrl_c_prints_what_was_stored_and_where_to_go_on(
    world: World, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, tmp_path: Path
) -> None:
    """A real ``refstream import`` process, held back by live work no worker takes: within
    5 s of its wait it says so on stderr with the figures (entries and their threshold, the
    lag and its threshold); a real SIGINT then ends it with exit 130 and the summary (what
    was stored, the line to go on from); run again from that line, it stores the rest."""
    code, n = world.link["code"], 40
    path = tmp_path / "history.ndjson"
    path.write_bytes(b"\n".join(_clicks(code, n)) + b"\n")
    stream = keys.stream(0)
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    proc = await asyncio.create_subprocess_exec(
        REFSTREAM,
        "import",
        str(path),
        "--workspace",
        world.workspace_id,
        "--json",
        "--batch-size",
        "1",
        "--share",
        "0.05",
        "--yield-backlog",
        "5",
        env=env_for(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        count = "SELECT count(*) FROM events WHERE dialect = 'import'"
        await wait_for(lambda: _at_least(pg, count, 1), what="the import's first batch", timeout=60)
        for i in range(10):  # live work that no worker takes: the import gives way
            await redis.xadd(stream, {"i": str(i)})
        told = await _wait_line(proc.stderr, "giving way", within_s=30)
        assert "10 live entries wait (threshold 5" in told and "ms (threshold 20 ms" in told, told
        assert int(told.split("giving way to live work for ")[1].split(" s")[0]) <= 5, told
        stored_before = await pg.fetchval(count)
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == EXIT_STOPPED, err
    assert b"Aborted" not in err and b"Traceback" not in err, err
    first = orjson.loads(out)
    assert first["finished"] is False and first["stored"] == stored_before >= 1, first
    assert first["resume_line"] == first["stored"] + 1, first  # one row a line, each batch committed

    await redis.delete(stream)
    rest = await import_cli(settings, path, world, "--start-line", str(first["resume_line"]))
    assert (rest["stored"], rest["duplicates"], rest["skipped"]) == (n - first["stored"], 0, first["stored"]), rest
    assert rest["finished"] is True and rest["resume_line"] is None
    assert await pg.fetchval(count) == n


async def _at_least(pg: asyncpg.Pool, query: str, n: int) -> bool:
    return int(await pg.fetchval(query)) >= n


async def test_csv_refusals_carry_their_true_lines_and_the_rows_after_them_are_read(
    world: World, settings: Settings, pg: asyncpg.Pool, tmp_path: Path
) -> None:
    code = world.link["code"]
    lines = [
        "\ufefftype,id,timestamp,link,referrer",  # 1: the header, after Excel's BOM
        f"click,c1,{_iso(2)},{code},",  # 2
        f'click,c2,{_iso(2)},{code},"https://a.example/\nsecond line of a quoted cell"',  # 3-4
        f'click,"c3"x,{_iso(2)},{code},',  # 5: a malformed quote
        f"click,c4,{_iso(2)},{code},",  # 6
        f"click,c5,{_iso(2)},{code},{'r' * 140_000}",  # 7: a cell over 128 KiB
        f"click,c6,{_iso(2)},{code},",  # 8
        f'click,c7,{_iso(2)},{code},"opened and never closed',  # 9
        f"click,c8,{_iso(2)},{code},",  # 10
    ]
    data = "\n".join(lines).encode() + b"\n" + f"click,c9,{_iso(2)},{code},caf".encode() + b"\xe9\n"  # 11: Latin-1
    data += f"click,c10,{_iso(2)},{code},\n".encode()  # 12
    path = tmp_path / "export.csv"
    path.write_bytes(data)
    out = await import_cli(settings, path, world, exit_code=EXIT_REFUSED)
    assert (out["stored"], out["refused"]) == (6, {"invalid": 4}), out
    shown = out["examples"]["invalid"]
    assert [s.split(":")[0] for s in shown] == ["line 5", "line 7", "line 9", "line 11"], shown
    assert "longer than" in shown[1] and "not UTF-8" in shown[3], shown
    stored = {r["visitor_id"] for r in await pg.fetch("SELECT visitor_id FROM events WHERE type = 1")}
    assert len(stored) == 6
    referrer = await pg.fetchval("SELECT referrer FROM events WHERE referrer LIKE 'https://a.example/%'")
    assert referrer == "https://a.example/\nsecond line of a quoted cell"


async def test_a_bom_is_accepted_and_a_line_not_utf8_is_refused_with_its_number(
    world: World, settings: Settings, tmp_path: Path
) -> None:
    code = world.link["code"]
    path = tmp_path / "excel.ndjson"
    rows = _clicks(code, 3)
    path.write_bytes(
        b"\xef\xbb\xbf" + rows[0] + b"\n" + b'{"type": "click", "id": "caf\xe9"}\n' + rows[1] + b"\n" + rows[2]
    )
    out = await import_cli(settings, path, world, exit_code=EXIT_REFUSED)
    assert (out["stored"], out["refused"]) == (3, {"invalid": 1}), out
    assert out["examples"]["invalid"] == ["line 2: not UTF-8 (byte 29 of the line)"], out


async def test_a_line_with_no_end_is_refused_without_being_read_whole(
    world: World, settings: Settings, tmp_path: Path
) -> None:
    """A 96 MiB last line with no newline is refused with its line number; the process's
    peak memory is that of a small file's import, not the line's."""
    code = world.link["code"]
    small = tmp_path / "small.ndjson"
    small.write_bytes(b"\n".join(_clicks(code, 2)) + b"\n")
    big = tmp_path / "big.ndjson"
    with big.open("wb") as f:
        f.write(b"\n".join(_clicks(code, 2, first=2)) + b"\n")  # lines 1-2
        chunk = b"x" * (1 << 20)
        for _ in range(96):  # 3: 96 MiB, no newline
            f.write(chunk)

    async def run(path: Path, code_wanted: int) -> tuple[dict[str, Any], int]:
        """The import's summary and its peak resident memory (KiB), from its own rusage."""
        out_path, err_path = tmp_path / "out", tmp_path / "err"
        with out_path.open("wb") as out_f, err_path.open("wb") as err_f:
            proc = subprocess.Popen(
                [REFSTREAM, "import", str(path), "--workspace", world.workspace_id, "--json", "--share", "1"],
                env=env_for(settings),
                stdout=out_f,
                stderr=err_f,
            )
        try:  # os.wait4: this child's own peak, where Popen.wait would reap it without one
            _, status, usage = await asyncio.wait_for(asyncio.to_thread(os.wait4, proc.pid, 0), 120)
        except TimeoutError:
            proc.kill()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.returncode == code_wanted, err_path.read_text()[-2000:]
        return orjson.loads(out_path.read_bytes()), int(usage.ru_maxrss)

    base, base_kib = await run(small, 0)
    assert (base["stored"], base["refused_total"]) == (2, 0), base
    out, peak_kib = await run(big, EXIT_REFUSED)
    assert (out["stored"], out["refused"]) == (2, {"invalid": 1}), out
    assert [s.split(":")[0] for s in out["examples"]["invalid"]] == ["line 3"], out
    assert peak_kib - base_kib < 32 * 1024, (peak_kib, base_kib)  # not the line's 96 MiB


async def test_timestamps_by_magnitude_and_a_sale_gets_the_date_checks(
    world: World, settings: Settings, pg: asyncpg.Pool, tmp_path: Path
) -> None:
    code, at = world.link["code"], _ms(3)
    rows: list[dict[str, Any]] = [
        {"type": "click", "id": "s", "timestamp": at // 1000, "link": code},  # 1: seconds
        {"type": "click", "id": "ms", "timestamp": at, "link": code},  # 2
        {"type": "click", "id": "us", "timestamp": at * 1000, "link": code},  # 3
        {"type": "click", "id": "ns", "timestamp": str(at * 1_000_000), "link": code},  # 4: as digits
        {"type": "click", "id": "big", "timestamp": str(at * 10**9), "link": code},  # 5: no unit that large
        {"type": "lead", "id": "l", "timestamp": at // 1000 + 60, "link": code, "customer_id": "cust-ts"},  # 6
        {
            "type": "sale",
            "id": "sale-s",
            "timestamp": at // 1000 + 120,
            "customer_id": "cust-ts",
            "amount": 900,
            "invoice_id": "inv-ts",
        },  # 7: seconds: attributed through the lead
        {"type": "sale", "id": "sale-70", "timestamp": 86_400, "customer_id": "cust-ts", "amount": 100},  # 8: 1970
        {"type": "sale", "id": "sale-fut", "timestamp": _ms(-3), "customer_id": "cust-ts", "amount": 100},  # 9
    ]
    path = tmp_path / "times.ndjson"
    path.write_bytes(b"\n".join(orjson.dumps(r) for r in rows) + b"\n")
    out = await import_cli(settings, path, world, exit_code=EXIT_REFUSED, REFSTREAM_EVENT_RETENTION_DAYS="30")
    assert out["refused"] == {"future": 1, "invalid": 1, "past_retention": 1}, out
    assert [out["examples"][k][0].split(":")[0] for k in ("invalid", "past_retention", "future")] == [
        "line 5",
        "line 8",
        "line 9",
    ]
    assert out["stored"] == 6, out
    times = [r["received_at"] for r in await pg.fetch("SELECT received_at FROM events WHERE type = 1")]
    assert len(times) == 4 and all(abs(t.timestamp() * 1000 - at) < 1000 for t in times), times
    sale = await pg.fetchrow("SELECT link_id, received_at FROM sales WHERE invoice_id = 'inv-ts'")
    assert str(sale["link_id"]) == world.link["id"], sale  # attributed: its time is its lead's day, not 1970
    assert abs(sale["received_at"].timestamp() * 1000 - (at + 120_000)) < 1000


async def test_a_lead_finds_a_click_an_earlier_run_imported(
    world: World, settings: Settings, pg: asyncpg.Pool, tmp_path: Path
) -> None:
    """What must outlive a batch (the clicks a later lead names) is in Postgres: a second
    file's leads name the first file's clicks; another source's click of that id is not
    theirs."""
    code = world.link["code"]
    clicks_file, leads_file = tmp_path / "clicks.ndjson", tmp_path / "leads.ndjson"
    clicks_file.write_bytes(b"\n".join(_clicks(code, 3)) + b"\n")
    leads = [
        {"type": "lead", "id": f"l{i}", "timestamp": _iso(1), "click": f"c{i}", "customer_id": f"cust-{i}"}
        for i in range(3)
    ]
    leads_file.write_bytes(b"\n".join(orjson.dumps(r) for r in leads) + b"\n")
    await import_cli(settings, clicks_file, world, "--batch-size", "2")
    elsewhere = await import_cli(settings, leads_file, world, "--source", "other", exit_code=EXIT_REFUSED)
    assert elsewhere["refused"] == {"unknown_click": 3}, elsewhere
    out = await import_cli(settings, leads_file, world)
    assert (out["stored"], out["refused_total"]) == (3, 0), out
    pairs = await pg.fetch(
        "SELECT l.click_id, c.event_id FROM events l JOIN events c ON c.event_id = l.click_id WHERE l.type = 2"
    )
    assert len(pairs) == 3
