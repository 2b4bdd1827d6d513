"""The spool's store: one SQLite database in WAL mode, ``<dir>/spool.sqlite3``.

Synchronous functions, run off the event loop by ``ingest.spool.spool``. Each connection is used
by one task at a time. Every write is one transaction: a batch of appends (``insert``), the
rows one drain step replayed (``delete``); the totals row (entries, bytes of pending rows)
moves in the same transaction, so the size is read in O(1) and is never wrong after a crash.
``synchronous=FULL``: the WAL is fsynced at each commit, so a committed append survives a
power loss. SQLite's own locking makes the file safe for several processes; a failed
transaction (disk full, file too large, I/O error) rolls back and leaves nothing behind.
"""

from __future__ import annotations

import base64
import errno
import os
import shutil
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ingest.contract import clock

FILE = "spool.sqlite3"
LOCK = "drain.lock"  # flock'ed by whoever drains: one drainer at a time over every process
BUSY_TIMEOUT_S = 5.0
# the WAL is copied into the database every this many pages and then written from its start
# again: a full disk still lets a drain delete what it replayed (it rewrites pages the
# files already hold), and the WAL never outgrows its last checkpoint by much
CHECKPOINT_PAGES = 64
# SQLite needs room to delete (WAL frames, then the checkpoint): this much disk is held in
# ``reserve`` and given up when a drain's delete meets a full disk; taken again once empty
RESERVE = "reserve"
RESERVE_BYTES = 1 << 20  # another process's transaction: wait this long for its lock

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS entries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms INTEGER NOT NULL,
        stream TEXT NOT NULL,
        envelope BLOB NOT NULL,
        extra BLOB,
        size INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS totals (
        one INTEGER PRIMARY KEY CHECK (one = 1),
        entries INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        error_op TEXT,
        error TEXT,
        error_at_ms INTEGER
    )""",
    "INSERT OR IGNORE INTO totals (one, entries, bytes) VALUES (1, 0, 0)",
)
# a keyed event's record while it is spooled, as Redis keeps it (``Once``), for ``window_ms``:
# processes that share the spool keep one copy of a key spooled while Redis is down. Bound:
# what was spooled within one idempotency window (each insert and each vacuum delete the
# expired). Made with the first insert that needs it, so
# opening a spool an older edge made writes nothing (on a full disk it must still open).
_RECORDS = (
    """CREATE TABLE IF NOT EXISTS records (
        record TEXT PRIMARY KEY,
        answer BLOB NOT NULL,
        expires_ms INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS records_expiry ON records (expires_ms)",
)


@dataclass(frozen=True, slots=True)
class Once:
    """A keyed event's idempotency check, kept with it: the drain appends the event only if
    Redis holds no record under ``record`` (the edge's own script, ``APPEND_ONCE``), and
    stores ``answer`` there for ``window_ms``, as the edge's append would have."""

    record: str
    answer: bytes
    window_ms: int


@dataclass(frozen=True, slots=True)
class Row:
    id: int
    at_ms: int
    stream: str
    envelope: bytes
    extra: list[tuple[Any, ...]]
    once: Once | None = None
    # a rerouted keyed row's records under earlier partition counts, checked before it appends
    earlier: tuple[str, ...] = ()


def path_in(directory: Path) -> Path:
    return directory / FILE


def connect(directory: Path) -> sqlite3.Connection:
    """Open (creating it if need be) the spool database of ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path_in(directory), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    try:
        # nothing here writes to an existing database: on a full disk it must still open
        _to_wal(conn)
        conn.execute("PRAGMA synchronous = FULL")
        # a drained row's bytes are zeroed, not left in a free page: the spool holds no
        # personal data once it is drained (docs/privacy.md)
        conn.execute("PRAGMA secure_delete = ON")
        conn.execute("PRAGMA journal_size_limit = 16777216")  # the WAL is truncated back to this
        conn.execute(f"PRAGMA wal_autocheckpoint = {CHECKPOINT_PAGES}")
        if conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'totals'").fetchone()[0] == 0:
            conn.execute("BEGIN IMMEDIATE")
            for statement in (*_SCHEMA, *_RECORDS):
                conn.execute(statement)
            conn.execute("COMMIT")
    except sqlite3.Error:
        rollback(conn)
        conn.close()
        raise
    return conn


def _to_wal(conn: sqlite3.Connection) -> None:
    """WAL mode. Switching a new file takes an exclusive lock, and SQLite answers "database
    is locked" at once, without its busy wait, to one of two processes switching it
    together (two edge processes on one spool directory, started at once): that one
    tries again until ``BUSY_TIMEOUT_S``."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the connection is closed and reopened by the caller


def totals(conn: sqlite3.Connection) -> tuple[int, int]:
    entries, n_bytes = conn.execute("SELECT entries, bytes FROM totals").fetchone()
    return int(entries), int(n_bytes)


def insert(
    conn: sqlite3.Connection,
    rows: Sequence[tuple[str, bytes, bytes | None, Once | None]],
    max_bytes: int,
    clear_error: bool,
) -> tuple[list[bool | bytes], tuple[int, int]]:
    """Append ``rows`` (stream, envelope, encoded extra, a keyed event's check) in one
    transaction, each only while the spool stays within ``max_bytes``; (for each row: kept,
    or the answer a copy of its key spooled first, the totals after). A keyed row whose key
    has a live record is not kept: the first copy stands. Raises what SQLite raised, the
    transaction rolled back: then nothing of the batch is kept."""
    now_ms = clock.now_ms()
    try:
        conn.execute("BEGIN IMMEDIATE")
        for statement in _RECORDS:  # a spool an older edge made has none yet
            conn.execute(statement)
        conn.execute("DELETE FROM records WHERE expires_ms <= ?", (now_ms,))
        entries, n_bytes = totals(conn)
        kept: list[bool | bytes] = []
        values = []
        for stream, envelope, extra, once in rows:
            if once is not None and (first := first_answer(conn, once.record)) is not None:
                kept.append(first)
                continue
            size = len(stream) + len(envelope) + len(extra or b"")
            ok = n_bytes + size <= max_bytes
            kept.append(ok)
            if ok:
                values.append((now_ms, stream, envelope, extra, size))
                entries, n_bytes = entries + 1, n_bytes + size
                if once is not None:
                    conn.execute(
                        "INSERT OR REPLACE INTO records (record, answer, expires_ms) VALUES (?, ?, ?)",
                        (once.record, once.answer, now_ms + once.window_ms),
                    )
        conn.executemany("INSERT INTO entries (at_ms, stream, envelope, extra, size) VALUES (?, ?, ?, ?, ?)", values)
        sql = "UPDATE totals SET entries = ?, bytes = ?" + (", error_op = NULL, error = NULL" if clear_error else "")
        conn.execute(sql, (entries, n_bytes))
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise
    return kept, (entries, n_bytes)


def first_answer(conn: sqlite3.Connection, record: str) -> bytes | None:
    """The answer the key's first spooled copy carries (its record), while it lives."""
    try:
        row = conn.execute("SELECT answer FROM records WHERE record = ? AND expires_ms > ?", (record, clock.now_ms()))
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None  # a spool an older edge made, no keyed copy in it since
        raise
    found = row.fetchone()
    return bytes(found[0]) if found is not None else None


def oldest(conn: sqlite3.Connection, limit: int, after: int = 0) -> list[Row]:
    """The ``limit`` oldest rows with an id above ``after``, oldest first."""
    cur = conn.execute(
        "SELECT id, at_ms, stream, envelope, extra FROM entries WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
    )
    return [Row(i, at, s, bytes(e), *decode_extra(x)) for i, at, s, e, x in cur.fetchall()]


def delete(conn: sqlite3.Connection, ids: Sequence[int]) -> tuple[int, int]:
    """Forget the rows ``ids`` (replayed into Redis), in one transaction; the totals after."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        marks = ",".join("?" * len(ids))
        gone, freed = conn.execute(
            f"SELECT count(*), coalesce(sum(size), 0) FROM entries WHERE id IN ({marks})", ids
        ).fetchone()
        conn.execute(f"DELETE FROM entries WHERE id IN ({marks})", ids)
        conn.execute("UPDATE totals SET entries = entries - ?, bytes = bytes - ?", (gone, freed))
        after = totals(conn)
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    return after


def vacuum_free(conn: sqlite3.Connection) -> None:
    """Give the disk back once the spool is empty after an outage: VACUUM rebuilds the file
    from what it holds (nothing, or what another edge appended meanwhile: kept)."""
    try:
        conn.execute("DELETE FROM records WHERE expires_ms <= ?", (clock.now_ms(),))
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
    conn.execute("VACUUM")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def take_reserve(directory: Path) -> bool:
    """Hold ``RESERVE_BYTES`` of real blocks (zeros written and fsynced, not a sparse file).
    False, and nothing left behind, when the disk has not that much room."""
    path = directory / RESERVE
    if path.exists():
        return True
    tmp = directory / (RESERVE + ".tmp")
    try:
        with open(tmp, "wb") as f:
            for _ in range(RESERVE_BYTES // 65536):
                f.write(bytes(65536))
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
    return True


def give_reserve(directory: Path) -> bool:
    """Free the reserve for the drain's deletes; True if there was one."""
    try:
        (directory / RESERVE).unlink()
    except FileNotFoundError:
        return False
    return True


def is_full(exc: BaseException) -> bool:
    """SQLITE_FULL, ENOSPC or EFBIG: the disk (or the file size limit) has no room."""
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def record_error(conn: sqlite3.Connection, op: str, error: str) -> None:
    """Best effort, for ``refstream status``: a full disk may refuse this too (it is logged
    and counted in /metrics by the caller all the same)."""
    try:
        conn.execute("UPDATE totals SET error_op = ?, error = ?, error_at_ms = ?", (op, error[:500], clock.now_ms()))
    except sqlite3.Error:
        rollback(conn)


def clear_error(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE totals SET error_op = NULL, error = NULL WHERE error IS NOT NULL")


# -- how a row is replayed: the commands that ride with it (a click cache SET), and for a
# keyed event its idempotency check. The ``extra`` column holds both: a JSON list of
# commands (the form rows had before keyed events kept their check), or an object with the
# commands ("c") and the check ("once"); no new column, so no migration on a full disk


def _arg(a: Any) -> Any:
    return {"b": base64.b64encode(a).decode()} if isinstance(a, bytes) else a


def _unarg(a: Any) -> Any:
    return base64.b64decode(a["b"]) if isinstance(a, dict) else a


def encode_extra(commands: Iterable[tuple[Any, ...]], once: Once | None = None) -> bytes | None:
    out = [[_arg(a) for a in cmd] for cmd in commands]
    if once is not None:
        check = {"record": once.record, "answer": _arg(once.answer), "window_ms": once.window_ms}
        return orjson.dumps({"c": out, "once": check})
    return orjson.dumps(out) if out else None


def decode_extra(raw: bytes | None) -> tuple[list[tuple[Any, ...]], Once | None]:
    if not raw:
        return [], None
    held = orjson.loads(raw)
    once = None
    if isinstance(held, dict):
        check = held["once"]
        once = Once(check["record"], _unarg(check["answer"]), int(check["window_ms"]))
        held = held["c"]
    return [tuple(_unarg(a) for a in cmd) for cmd in held], once


# -- what `refstream status` reads, from another process ---------------------------------


@dataclass(slots=True)
class Usage:
    exists: bool
    entries: int = 0
    bytes: int = 0  # of pending rows (what REFSTREAM_SPOOL_MAX_BYTES caps)
    file_bytes: int = 0  # the database and its WAL on disk
    oldest_age_s: float | None = None
    free_bytes: int | None = None  # on the spool's file system
    error: str | None = None  # the last failure an edge recorded (op: error), or why this read failed


def usage(directory: Path) -> Usage:
    """Read-only, without creating anything: the totals row, the oldest entry, the files."""
    db = path_in(directory)
    if not directory.is_dir():
        return Usage(False)
    out = Usage(True, free_bytes=shutil.disk_usage(directory).free)
    if not db.exists():
        return out
    out.file_bytes = sum(p.stat().st_size for p in (db, db.with_name(FILE + "-wal")) if p.exists())
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
        try:
            row = conn.execute("SELECT entries, bytes, error_op, error, error_at_ms FROM totals").fetchone()
            first = conn.execute("SELECT at_ms FROM entries ORDER BY id LIMIT 1").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        out.error = f"unreadable: {exc}"
        return out
    if row is not None:
        out.entries, out.bytes = int(row[0]), int(row[1])
        if row[3]:
            out.error = f"{row[2]}: {row[3]} (at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(row[4] / 1000))})"
    if first is not None:
        out.oldest_age_s = max(0.0, clock.now() - first[0] / 1000)
    return out


def describe(exc: BaseException) -> str:
    """An error as one short line: SQLite's code name when it has one (SQLITE_FULL, ...)."""
    name = getattr(exc, "sqlite_errorname", None)
    if isinstance(exc, OSError) and exc.errno is not None:
        name = os.strerror(exc.errno)
    return f"{name}: {exc}" if name else f"{type(exc).__name__}: {exc}"
