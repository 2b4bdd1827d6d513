"""Starting against a database that is missing, not migrated, refusing us or unreachable.

- ``refstream migrate`` records the schema version, idempotently, under its lock;
- ``serve`` and ``work`` (``--drain`` too) refuse a missing, unmigrated or refused database
  with one line naming host:port/database and what to run; ``work`` waits for an
  unreachable Postgres (one log line, not one per try) and ``serve`` starts without it;
- an edge whose database is missing or not migrated answers every route in its contract,
  never 500, and /readyz says why until ``refstream migrate`` has run.

Every database here is created (or only named) by the test, under a unique name, and
dropped by it.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import orjson
import pytest
from structlog.testing import capture_logs

from ingest.contract import wire
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.contract.wire import FIELD
from ingest.manage import schema_check
from ingest.manage.db import SCHEMA_VERSION, migrate
from ingest.manage.schema_check import DbStatus, Kind, SchemaProbe, check_url
from refstream.embedded import free_port
from refstream.services import Services, with_database

from ._procs import Procs, env_for, run_command
from ._world import BROWSER, World, call, start_edge
from .conftest import wait_for

TRACKED = {"success": True, "data": {"tracked": True}}


# -- databases of this test's own -----------------------------------------------------


@pytest.fixture
async def empty_url(services: Services, scratch_url: str) -> str:
    """A database that exists and holds nothing: never migrated."""
    server = await asyncpg.connect(with_database(services.postgres_url, "postgres"))
    try:
        await server.execute(f'CREATE DATABASE "{database(scratch_url)}"')
    finally:
        await server.close()
    return scratch_url


def database(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def where(url: str) -> str:
    """host:port/database, spelled out here rather than by the code under test."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5432}/{database(url)}"


def as_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{user}@{parts.hostname}:{parts.port or 5432}"))


async def recorded(url: str) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(url)
    try:
        return [tuple(r) for r in await conn.fetch("SELECT version, migrated_at FROM refstream_schema")]
    finally:
        await conn.close()


async def run_cli(settings: Settings, *args: str, within_s: float = 60, **env: str) -> tuple[int, str, str]:
    """A command to its end, with this test's settings: (exit code, stdout, stderr)."""
    return await run_command(*args, env=env_for(settings, **env), within_s=within_s)


# -- migrate ---------------------------------------------------------------------------


async def test_migrate_records_the_version_once_and_never_lowers_it(procs: Procs, scratch_url: str) -> None:
    assert await procs.cli("migrate", DATABASE_URL=scratch_url) == {
        "migrated": True,
        "database_created": True,
        "shards": ["default"],
    }
    ((version, first_at),) = await recorded(scratch_url)
    assert version == SCHEMA_VERSION
    assert (await check_url(scratch_url)) == DbStatus(Kind.OK, version=SCHEMA_VERSION)

    # a repeat changes nothing, not even the time
    assert await procs.cli("migrate", DATABASE_URL=scratch_url) == {
        "migrated": True,
        "database_created": False,
        "shards": ["default"],
    }
    assert await recorded(scratch_url) == [(SCHEMA_VERSION, first_at)]

    # a newer build's version stays (and is accepted): schema changes only add
    conn = await asyncpg.connect(scratch_url)
    try:
        await conn.execute("UPDATE refstream_schema SET version = $1", SCHEMA_VERSION + 5)
        assert await migrate(conn) == SCHEMA_VERSION + 5
        assert (await check_url(scratch_url)).ok
        # a database migrated before versions were recorded: not migrated, until it is
        await conn.execute("DROP TABLE refstream_schema")
        status = await check_url(scratch_url)
        assert (status.kind, status.version) == (Kind.NOT_MIGRATED, 0)
        assert await migrate(conn) == SCHEMA_VERSION
    finally:
        await conn.close()


async def test_concurrent_migrations_queue_on_the_lock(empty_url: str) -> None:
    conns = [await asyncpg.connect(empty_url) for _ in range(3)]
    try:
        assert await asyncio.gather(*(migrate(c) for c in conns)) == [SCHEMA_VERSION] * 3
    finally:
        for c in conns:
            await c.close()
    assert [v for v, _ in await recorded(empty_url)] == [SCHEMA_VERSION]


async def test_an_older_recorded_version_is_named(empty_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    conn = await asyncpg.connect(empty_url)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    monkeypatch.setattr(schema_check, "SCHEMA_VERSION", SCHEMA_VERSION + 1)  # this build expects the next one
    status = await check_url(empty_url)
    assert status.kind is Kind.NOT_MIGRATED
    assert status.line(empty_url) == (
        f"postgres at {where(empty_url)}: schema version {SCHEMA_VERSION}, expected {SCHEMA_VERSION + 1};"
        " run: refstream migrate"
    )


# -- serve and work refuse what waiting cannot fix --------------------------------------


@pytest.mark.parametrize("command", [["serve"], ["work"], ["work", "--drain"]], ids=" ".join)
async def test_serve_and_work_refuse_a_database_that_is_missing_unmigrated_or_refused(
    settings: Settings, scratch_url: str, services: Services, command: list[str]
) -> None:
    args = [*command, "--port", str(free_port())] if command == ["serve"] else command
    server_url = with_database(services.postgres_url, "postgres")
    stranger = as_user(server_url, f"refstream_nobody_{secrets.token_hex(4)}")
    cases = [
        (scratch_url, "database does not exist", "run: refstream migrate"),
        (None, f"not migrated (schema version 0, expected {SCHEMA_VERSION})", "run: refstream migrate"),
        (stranger, "authentication failed", "DATABASE_URL"),
    ]
    for url, reason, todo in cases:
        if url is None:  # the scratch database, now created and still empty
            server = await asyncpg.connect(server_url)
            try:
                await server.execute(f'CREATE DATABASE "{database(scratch_url)}"')
            finally:
                await server.close()
            url = scratch_url
        code, out, err = await run_cli(settings, *args, DATABASE_URL=url, REFSTREAM_LOG_FLUSH_MS="0")
        lines = err.strip().splitlines()
        assert code != 0 and out == "", (code, out, err)
        assert len(lines) == 1, err  # one line, no traceback, no log lines before it
        assert f"postgres at {where(url)}: " in lines[0] and reason in lines[0] and todo in lines[0], lines[0]


# -- unreachable: serve starts, work waits ----------------------------------------------


async def test_serve_starts_while_postgres_is_unreachable_and_readyz_says_why(
    procs: Procs, keys: Keys, redis: Any
) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"  # nothing listens there
    base = await procs.start_edge(DATABASE_URL=url, REFSTREAM_LOG_FLUSH_MS="0")
    status, body, _ = await call("POST", f"{base}/api/v1/referral/click/somecode")
    assert (status, body) == (200, TRACKED)

    async def appended() -> bool:  # accepted: in Redis, or in the edge's spool until it drains
        lengths: list[int] = [await redis.xlen(s) for s in keys.streams]
        return sum(lengths) == 1

    await wait_for(appended, timeout=30, what="the click in its stream")
    status, body, _ = await call("GET", f"{base}/readyz")
    assert status == 503 and body["redis"] == "ok", body
    assert body["postgres"].startswith("error: unreachable ("), body
    warned = [line for line in procs.logs().splitlines() if '"postgres.unreachable"' in line]
    assert len(warned) == 1 and where(url) in warned[0], procs.logs()


class Gate:
    """A port in front of the test Postgres: shut (each connection is accepted, counted and
    hung up on) until ``open``, then a plain forwarder."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self.refused = 0
        self.open = False
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            self.refused += 1
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            dst.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)


async def test_work_waits_for_an_unreachable_postgres_logging_once_then_works(
    settings: Settings, procs: Procs, pg: asyncpg.Pool, world: World, keys: Keys, redis: Any
) -> None:
    gate = Gate(settings.database_url)
    port = await gate.start()
    parts = urlsplit(settings.database_url)
    url = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{port}"))
    worker = procs.start("work", DATABASE_URL=url, REFSTREAM_LOG_FLUSH_MS="0")
    try:

        async def tried(n: int) -> bool:
            assert worker.poll() is None, procs.logs()  # waiting, not exiting
            return gate.refused >= n

        await wait_for(lambda: tried(4), what="several connection attempts")
        waiting = [line for line in procs.logs().splitlines() if '"postgres.waiting"' in line]
        assert len(waiting) == 1, procs.logs()  # one line for the state, none per try
        assert where(url) in waiting[0] and "unreachable" in waiting[0]

        gate.open = True

        async def ready() -> bool:
            return '"postgres.ready"' in procs.logs()

        await wait_for(ready, what="the worker to find Postgres")
        envelope = Envelope(
            type=EventType.CLICK, dialect=Dialect.BIORE, payload={"code": "PARTNER123"}, user_agent=BROWSER
        )
        await redis.xadd(keys.stream_for("PARTNER123"), {FIELD: wire.to_blob(envelope)})

        async def counted() -> bool:
            return bool(await pg.fetchval("SELECT clicks FROM links WHERE code = 'PARTNER123'") == 1)

        await wait_for(counted, timeout=60, what="the click, counted through the gate")
        assert sum('"postgres.waiting"' in line for line in procs.logs().splitlines()) == 1
    finally:
        # the worker's shutdown may still talk to Postgres through the gate: keep the loop
        # (and so the gate) running while it ends
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            await asyncio.to_thread(worker.wait, 30)
        await gate.close()


# -- an edge whose database is missing or not migrated ------------------------------------


async def not_500(base: str, keys: Keys, redis: Any) -> None:
    """Every route that may ask Postgres on a fallback answers its contract."""
    before = sum([await redis.xlen(s) for s in keys.streams])
    with capture_logs() as logs:
        status, body, _ = await call("POST", f"{base}/api/v1/referral/click/somecode")
    assert (status, body) == (200, TRACKED)  # seed 000: accepted, the worker decides
    assert sum([await redis.xlen(s) for s in keys.streams]) == before + 1
    warnings = [e for e in logs if e["event"] == "postgres.unavailable"]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning", logs
    assert not any("exc_info" in e or "exception" in e or e["log_level"] == "error" for e in logs), logs

    unavailable = [
        ("GET", "/api/v1/referrals/validate/somecode", None, {}),
        ("POST", "/api/v1/referrals/convert", {"code": "somecode", "referred_session_id": "s"}, {}),
        ("POST", "/api/v1/track/click", {"affiliate_url": "https://x.test/?aff=somecode"}, {}),
        ("POST", "/v1/track/click", {"ref": "somecode"}, {"Authorization": "Bearer rs_live_unknown"}),
        (
            "POST",
            "/api/track/lead",
            {"clickId": "c", "eventName": "e", "customerExternalId": "u"},
            {"Authorization": "Bearer rs_live_unknown"},
        ),
        ("POST", "/v1/events/batch", [{"type": "click", "ref": "somecode"}], {"Authorization": "Bearer rs_live_x"}),
        ("GET", "/api/v1/referrals/stats/p1", None, {"X-API-Key": "rs_live_unknown"}),
        (
            "POST",
            "/api/v1/referrals/generate",
            {"participant_id": "p", "campaign_id": str(uuid.UUID(int=0))},
            {"X-API-Key": "rs_live_unknown"},
        ),
    ]
    for method, path, payload, headers in unavailable:
        status, body, hdrs = await call(method, f"{base}{path}", json=payload, headers=headers)
        assert (status, hdrs.get("Retry-After")) == (503, "1"), (path, status, body)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/r/somecode", allow_redirects=False) as r:
            assert (r.status, r.headers["Location"]) == (302, "/")  # the fallback page, never an error


async def readyz(base: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/readyz") as r:
            return r.status, orjson.loads(await r.read())


@pytest.mark.parametrize("state", ["missing", "unmigrated"])
async def test_an_edge_on_a_missing_or_unmigrated_database_never_answers_500_and_readyz_says_why(
    settings: Settings, procs: Procs, services: Services, scratch_url: str, keys: Keys, redis: Any, state: str
) -> None:
    if state == "unmigrated":
        server = await asyncpg.connect(with_database(services.postgres_url, "postgres"))
        try:
            await server.execute(f'CREATE DATABASE "{database(scratch_url)}"')
        finally:
            await server.close()
        reason = f"error: not migrated (schema version 0, expected {SCHEMA_VERSION}); run: refstream migrate"
    else:
        reason = "error: database does not exist; run: refstream migrate (it creates the database)"
    runner, base = await start_edge(settings.model_copy(update={"database_url": scratch_url}))
    try:
        await not_500(base, keys, redis)
        assert await readyz(base) == (503, {"ready": False, "redis": "ok", "postgres": reason})

        created = await procs.cli("migrate", DATABASE_URL=scratch_url)
        assert created == {"migrated": True, "database_created": state == "missing", "shards": ["default"]}

        async def ready() -> bool:
            return await readyz(base) == (200, {"ready": True, "redis": "ok", "postgres": "ok"})

        await wait_for(ready, timeout=15, what="/readyz after refstream migrate")
        with capture_logs() as logs:  # Postgres answers now: an unknown code, and no warning about Postgres
            assert (await call("POST", f"{base}/api/v1/referral/click/othercode"))[:2] == (200, TRACKED)
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["click.unknown_code"], logs
    finally:
        await runner.cleanup()


async def test_a_code_postgres_cannot_hold_is_unknown_not_unavailable(edge: str, redis: Any) -> None:
    # the link cache is cold (a fresh prefix): the code would be asked of Postgres, which
    # refuses NUL in text; that is no outage, and the client must not be told to retry
    status, body, _ = await call(
        "POST", f"{edge}/api/v1/track/click", json={"affiliate_url": "https://x.test/?aff=a%00b"}
    )
    assert (status, body) == (400, {"success": False, "error": "No referral link found for aff=a\x00b"})


# -- /readyz stays cheap ------------------------------------------------------------------


async def test_the_probe_asks_once_per_period_however_many_ask_it() -> None:
    now = [100.0]
    asked = []

    async def check() -> DbStatus:
        asked.append(now[0])
        await asyncio.sleep(0)  # let the other callers queue behind this one
        return DbStatus(Kind.OK, version=SCHEMA_VERSION)

    probe = SchemaProbe(check, ttl_s=2.0, clock=lambda: now[0])
    assert {s.ok for s in await asyncio.gather(*(probe.status() for _ in range(20)))} == {True}
    now[0] = 101.5
    await probe.status()
    assert asked == [100.0]
    now[0] = 102.0
    await probe.status()
    assert asked == [100.0, 102.0]


def test_the_line_names_no_password() -> None:
    status = DbStatus(Kind.AUTH_FAILED, "authentication failed (x)", "check the user and password in DATABASE_URL")
    line = status.line("postgresql://alice:s3cret@db.internal:6543/refs")
    assert line.startswith("postgres at db.internal:6543/refs: ") and "s3cret" not in line and "alice" not in line


async def test_a_database_outage_a_route_did_not_expect_is_503_never_500() -> None:
    """Every route's wrapper's last line: an outage that escaped a route's own handling (a
    management route on a read-only or unmigrated database, say) is "try again", while any
    other error stays a bare 500, and neither shows a trace."""
    from aiohttp import web

    from ingest.edge.metrics import EdgeMetrics
    from ingest.host.wrap import Frame

    raised: dict[str, BaseException] = {
        "/read-only": asyncpg.exceptions.ReadOnlySQLTransactionError(
            "cannot execute INSERT in a read-only transaction"
        ),
        "/unmigrated": asyncpg.exceptions.UndefinedTableError('relation "links" does not exist'),
        "/bug": asyncpg.exceptions.UniqueViolationError("duplicate key value"),
    }

    async def handler(request: web.Request) -> web.Response:
        raise raised[request.path]

    app = web.Application()
    frame = Frame(EdgeMetrics())
    frame.add_routes(app.router, [web.get(path, handler) for path in raised])
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        for path, want in (("/read-only", 503), ("/unmigrated", 503), ("/bug", 500)):
            status, body, headers = await call("GET", f"http://127.0.0.1:{port}{path}")
            assert status == want, (path, status, body)
            assert (headers.get("Retry-After") == "1") == (want == 503)
            assert "Traceback" not in orjson.dumps(body).decode()
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:secret@db.internal:6543/app", "db.internal:6543/app"),
        ("postgresql://u:secret@[::1]/app", "[::1]:5432/app"),
        # a primary and its standby (libpq's multi-host form, target_session_attrs=read-write)
        (
            "postgresql://u:secret@10.0.0.1:5432,10.0.0.2:5433/app?target_session_attrs=read-write",
            "10.0.0.1:5432,10.0.0.2:5433/app",
        ),
    ],
)
def test_logs_name_the_database_without_its_credentials(url: str, shown: str) -> None:
    assert schema_check.target(url) == shown
