"""Buffered log lines (``REFSTREAM_LOG_FLUSH_MS``), in real processes: a line reaches
stderr within the flush interval while the process keeps running; at exit every line
is there, whole and in order, structlog's and the standard library's interleaved as
they were logged."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from .conftest import wait_for

SCRIPT = """
import logging, sys, time
import structlog
from ingest.contract.logs import configure_logging
configure_logging("info", flush_ms=int(sys.argv[1]))
log = structlog.get_logger("t")
std = logging.getLogger("lib")
n = int(sys.argv[2])
for i in range(n):
    if i % 3 == 2:
        std.warning("std %d", i)
    else:
        log.info("line", i=i, pad="x" * (i % 200))
if sys.argv[3] == "linger":
    log.info("lingering")
    time.sleep(60)
"""


def _spawn(tmp_path: Path, flush_ms: int, n: int, mode: str) -> tuple[subprocess.Popen[bytes], Path]:
    out = tmp_path / "stderr.log"
    with open(out, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(flush_ms), str(n), mode], stderr=f)
    return proc, out


def test_every_line_is_written_in_order_by_exit(tmp_path: Path):
    proc, out = _spawn(tmp_path, 200, 5000, "exit")  # far more than one 64 KiB buffer
    assert proc.wait(60) == 0
    lines = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    seen = [rec["i"] if "i" in rec else int(rec["event"].split()[1]) for rec in lines]
    assert seen == list(range(5000))
    assert {rec["level"] for rec in lines} == {"info", "warning"}


async def test_a_line_is_written_within_the_interval_while_running(tmp_path: Path):
    proc, out = _spawn(tmp_path, 200, 10, "linger")
    try:

        async def written() -> bool:
            return b'"lingering"' in out.read_bytes()

        await wait_for(written, timeout=10, what="the buffered line to reach stderr")
        assert proc.poll() is None  # written by the flusher, not at exit
        assert len(out.read_bytes().splitlines()) == 11
    finally:
        proc.kill()
        proc.wait()


def test_flushes_cut_at_line_ends_within_pipe_buf():
    from ingest.contract.logs import PIPE_BUF, _chunks

    lines = [b"x" * (i * 37 % 900) + b"\n" for i in range(400)] + [b"y" * 9000 + b"\n", b"z\n"]
    data = b"".join(lines)
    chunks = _chunks(data)
    assert b"".join(chunks) == data
    assert all(c.endswith(b"\n") for c in chunks)
    # each write is one or more whole lines, within PIPE_BUF unless one line alone is longer
    assert all(len(c) <= PIPE_BUF or c.count(b"\n") == 1 for c in chunks)
    assert len(chunks) < len(lines) / 3  # and lines are gathered, not written one by one
    assert _chunks(b"") == [] and _chunks(b"a\n") == [b"a\n"]


def test_level_and_timestamp_fields(tmp_path: Path):
    proc, out = _spawn(tmp_path, 0, 3, "exit")  # line by line: the unbuffered path too
    assert proc.wait(60) == 0
    lines = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [rec["level"] for rec in lines] == ["info", "info", "warning"]
    for rec in lines:  # ISO 8601, UTC, microseconds, as structlog's TimeStamper(fmt="iso", utc=True)
        stamp = datetime.strptime(rec["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        assert abs((datetime.now(UTC) - stamp).total_seconds()) < 60


@pytest.mark.once
def test_access_log_setting():
    from ingest.contract.logs import AccessLog

    errors, every, none = AccessLog.parse("errors"), AccessLog.parse("ALL"), AccessLog.parse("sample:0")
    assert [errors.wants(s) for s in (200, 302, 399, 400, 429, 503)] == [False] * 3 + [True] * 3
    assert all(every.wants(s) for s in (200, 204, 302, 404))
    assert not none.wants(200) and none.wants(404)
    some = AccessLog.parse("sample:0.25")
    kept = sum(some.wants(200) for _ in range(20_000))
    assert 4000 < kept < 6000  # about a quarter (the bounds are ~17 standard deviations wide)
    for bad in ("sometimes", "sample:", "sample:1.5", "sample:-0.1", "sample:x"):
        with pytest.raises(ValueError):
            AccessLog.parse(bad)


@pytest.mark.once
def test_the_request_id_and_event_id_on_every_line_while_it_runs():
    """What each route's wrapper sets: one contextvar per request, read when a line is
    written; nothing left behind once it is reset."""
    import structlog
    from structlog.testing import capture_logs

    from ingest.contract.logs import CURRENT_REQUEST, RequestLog, _merge_request, note_event

    with capture_logs(processors=[_merge_request]) as lines:
        log = structlog.get_logger("t")
        note_event("nobody's")  # outside a request: no effect
        token = CURRENT_REQUEST.set(RequestLog("rid-1"))
        log.info("before")
        note_event("e-1")
        log.warning("after")
        CURRENT_REQUEST.reset(token)
        log.info("outside")
    assert [(x["event"], x.get("request_id"), x.get("event_id")) for x in lines] == [
        ("before", "rid-1", None),
        ("after", "rid-1", "e-1"),
        ("outside", None, None),
    ]
