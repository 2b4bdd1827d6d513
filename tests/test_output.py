"""One output convention for the operator commands: a rich table by default, ``--json``
for the same data as JSON; tables that read at 80 columns and never show outside data as
markup or raw control characters."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import click
import orjson
from rich.console import Console

from ingest.contract import wire
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.keys import Keys
from ingest.contract.wire import FIELD
from refstream.commands import reconcile as reconcile_cmd
from refstream.commands import replay as replay_cmd
from refstream.commands import status as status_cmd
from refstream.commands import workspace as workspace_cmd
from workers.group.presence import WorkerState
from workers.ops import status as st

from ._procs import REFSTREAM, Procs, env_for

LONG = "refstream"  # the default prefix: `refstream:events:{0}` alone filled the column before
HOST = "ip-10-0-12-34.eu-west-1.compute.internal-12345"


def render(fn: Any, *args: Any) -> str:
    console = Console(width=80, file=io.StringIO(), record=True)
    fn(*args, console)
    text: str = console.export_text()
    assert all(len(line) <= 80 for line in text.splitlines())
    return text


def rows(text: str, title: str) -> list[list[str]]:
    """The body rows of the table titled ``title``: its cells, stripped."""
    lines = text.splitlines()
    start = lines.index(next(line for line in lines if line.strip() == title))
    out: list[list[str]] = []
    for line in lines[start + 4 :]:
        if line.startswith("└"):
            return out
        out.append([c.strip() for c in line.strip("│").split("│")])
    raise AssertionError(f"no end to table {title!r}")


def snapshot(keys: Keys) -> st.Snapshot:
    parts = [
        st.Partition(
            p,
            stream,
            1_234_567,
            3600.0,
            0.5,
            [
                st.Group("workers", 12, False, 3, 4.2, "1712345678901-12", [st.Consumer(HOST, 3, 1.5)]),
                st.Group("analytics", 99_999, True, 0, None, "1712345678901-0", []),
            ],
        )
        for p, stream in enumerate(keys.streams)
    ]
    return st.Snapshot(
        0,
        True,
        [],
        st.Thresholds(),
        parts,
        st.Dead(2, 30.0),
        st.Spool("/var/lib/refstream/spool", True, 2, 150),
        st.Throughput(60, 100, False, 1.6, 90, 1.5),
        [WorkerState(HOST, "blocked", ["postgres_unavailable", "redis_oom"], 12.0, 1.0, False)],
    )


def test_status_reads_at_80_columns_with_partitions_by_number() -> None:
    for keys in (Keys(LONG, 4), Keys("acme-production-eu-west-1:tenant-0042", 4)):
        text = render(status_cmd.render_status, snapshot(keys), keys)
        assert "…" not in text  # nothing cut short: long values fold onto a second line
        assert f"{keys.prefix}:events:{{p}}" in text  # the stream key, said once
        assert keys.streams[0] not in text
        assert [r[0] for r in rows(text, "partitions")] == ["0", "1", "2", "3"]
        assert [r[0] for r in rows(text, "groups")] == ["0", "0", "1", "1", "2", "2", "3", "3"]
        assert [r[5] for r in rows(text, "groups")][:2] == ["1712345678901-12", "1712345678901-0"]
        consumers = rows(text, "consumers")
        assert [r[0] for r in consumers if r[0]] == ["0", "1", "2", "3"]
        assert "".join(r[2] for r in consumers[:2]) == HOST  # folded, whole


def test_dead_letters_read_at_80_columns_and_never_as_markup() -> None:
    keys = Keys(LONG, 4)
    hostile = "store: refused [/bold] [red]x \x1b[31m\x07"
    letter = {
        "dead_id": "1712345678901-0",
        "stream": keys.streams[2],
        "entry_id": "1712345678000-3",
        "error": hostile,
        "deliveries": 6,
        "at_ms": 1712345678901,
        "event_id": "ab" * 16,
        "type": "click",
        "dialect": "biore",
        "code": "[link]",
    }
    text = render(status_cmd.render_letters, [letter], keys)
    (dead_id, p, entry_id, *_), *wrapped = cells = rows(text, "dead letters, oldest first")
    assert (dead_id, p, entry_id) == ("1712345678901-0", "2", "1712345678000-3")  # ids whole, on one line
    assert all(r[:3] == ["", "", ""] for r in wrapped)  # the error wrapped beside them
    assert "\x1b" not in text and "\x07" not in text
    assert "".join(r[3] for r in cells) == "store:refused[/bold][red]x\\x1b[31m\\x07"  # as text, escaped
    assert cells[0][6] == "[link]"

    detail = letter | {
        "envelope": None,
        "decode_error": "not JSON",
        "raw": "\x1b[2J\\xff",
        "raw_bytes": 9,
        "other_fields": {"via": "[b]x"},
    }
    text = render(status_cmd.render_letter, detail, keys)
    assert "\x1b" not in text and "\\x1b[2J\\xff" in text and "[b]x" in text
    assert f"2 ({keys.streams[2]})" in text and "2024-04-05T19:34:38.901+00:00" in text


def test_replay_and_drift_tables() -> None:
    keys = Keys(LONG, 4)
    counts = {"entries": 3, "inserted": 1, "duplicates": 2, "skipped": 0, "undecodable": 0, "failed": 0}
    result = {
        "range": {"from": "1-0", "to": "9-0"},
        "dry_run": False,
        "partitions": {"0": counts, "3": counts},
        "totals": {k: 2 * v for k, v in counts.items()},
    }
    text = render(replay_cmd.render_replay, result, keys)
    replayed = rows(text, "replay: from 1-0 to 9-0")
    assert [r[:3] for r in replayed] == [["0", "3", "1"], ["3", "3", "1"], ["all", "6", "2"]]
    drift = [{"code": "A[b]", "counter": "last_clicked_at", "stored": None, "recomputed": "2024-03-02T10:00:00+00:00"}]
    text = render(reconcile_cmd.render_drift, drift, False)
    assert rows(text, "drift (--fix repairs it)") == [
        ["A[b]", "-", "last_clicked_at", "-", "2024-03-02T10:00:00+00:00"]
    ]
    assert "no drift" in render(reconcile_cmd.render_drift, [], False)


def test_replay_tables_fit_80_columns_with_whole_headers_and_an_open_end() -> None:
    """Seven-digit counts in every column of both tables (a dry run's and a replay's):
    each header stays one word on one line, each count whole, within 80 columns; a range
    open at its end reads "to the end", not as the largest stream id."""
    keys = Keys(LONG, 4)
    big = 9_876_543
    for dry_run, fields in (
        (True, ["entries", "archived", "new", "stored", "repeats", "skipped", "undecodable", "failed"]),
        (False, ["entries", "archived", "inserted", "duplicates", "skipped", "undecodable", "failed"]),
    ):
        counts = dict.fromkeys(fields, 0) | {"entries": big, fields[2]: big // 2, fields[3]: big // 2}
        end = "18446744073709551615-18446744073709551615"
        result = {
            "range": {"from": "1712345678901-0", "to": end},
            "dry_run": dry_run,
            "partitions": {str(p): counts for p in range(4)},
            "totals": counts | {"archived": 12},
        }
        text = render(replay_cmd.render_replay, result, keys)  # asserts 80 columns
        title = f"replay{' (dry run)' if dry_run else ''}: from 1712345678901-0 to the end"
        table = rows(text, title)
        assert end not in text
        header = next(line for line in text.splitlines() if "entries" in line)
        assert [c.strip() for c in header.strip("┃").split("┃")] == ["p"] + [f for f in fields if f != "archived"]
        assert table[0][:2] == ["0", str(big)] and table[-1][0] == "all"
        assert "read from the archive (Redis no longer held them): 12 of the entries" in text
    assert replay_cmd.described({"from": "0-0", "to": "5-1"}) == "from the start to 5-1"


def test_every_command_that_prints_data_takes_json() -> None:
    commands: list[click.Command] = [
        status_cmd.status,
        replay_cmd.replay,
        reconcile_cmd.reconcile,
        workspace_cmd.set_bot_policy,
        *status_cmd.dead.commands.values(),
    ]
    assert {c.name for c in commands} >= {"list", "show", "requeue", "drop"}
    for c in commands:
        flags = {o for p in c.params for o in p.opts}
        assert "--json" in flags, c.name


async def test_dead_commands_print_a_table_and_json_on_request(procs: Procs, redis: Any, keys: Keys) -> None:
    envelope = wire.to_blob(Envelope(EventType.CLICK, Dialect.BIORE, {"code": "gone"}))
    fields = {FIELD: envelope, b"stream": keys.streams[1].encode(), b"id": b"1-1", b"error": b"store: [/] refused"}
    dead_id = (await redis.xadd(keys.dead, fields)).decode()

    async def run(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            REFSTREAM,
            *args,
            env=env_for(procs.settings),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        return out.decode()

    table = await run("dead", "show", dead_id)
    assert dead_id in table and "store: [/] refused" in table and '{"code":"gone"}' in table
    assert orjson.loads(await run("dead", "show", dead_id, "--json"))["code"] == "gone"
    table = await run("dead", "requeue", "--code", "nothing")
    assert rows(table, "requeued to their partitions") == [["0", "0", "0", "-"]]
    assert orjson.loads(await run("dead", "drop", "--code", "nothing", "--reason", "r", "--json"))["matched"] == 0
