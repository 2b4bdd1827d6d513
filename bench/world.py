"""The bench's data: a throwaway database with one workspace, its key and a set of links;
copies of it (``CREATE DATABASE … TEMPLATE``) wherever a phase needs a fresh schema; the
realistic requests for each route; mixed envelopes for the worker phases.
"""

from __future__ import annotations

import random
import secrets
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from ingest.contract import clicks, links, wire
from ingest.contract.connections import Redis, create_pg_pool
from ingest.contract.events import Dialect, Envelope, EventType, uuid7
from ingest.contract.keys import GROUP, Keys
from ingest.contract.settings import Settings
from ingest.manage import admin
from ingest.manage.db import ensure_database, migrate
from refstream.services import with_database

BROWSER = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36"
UAS = [
    BROWSER,
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4"
    " Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4"
    " Safari/605.1.15",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
]
LINKS = 50
REFERRER = "https://blog.example.com/"


@dataclass(slots=True)
class World:
    server_url: str  # Postgres, server level
    database: str
    workspace_id: str
    api_key: str
    codes: list[str]
    click_ids: list[str]

    @property
    def template(self) -> str:
        """A frozen copy made right after setup: no session ever opens it, so it can be copied."""
        return self.database + "_tpl"

    def url(self, database: str | None = None) -> str:
        return with_database(self.server_url, database or self.database)


def client_ip(i: int) -> str:
    # public addresses spread over countries, so geo lookups and rate-limit keys vary
    return f"{(81, 77, 93, 185, 104, 51)[i % 6]}.{(i * 7) % 250 + 1}.{(i * 13) % 250}.{i % 250 + 1}"


async def create(server_url: str, database: str) -> World:
    url = with_database(server_url, database)
    await ensure_database(url)
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
        ws = await admin.create_workspace(conn, "Bench")
        program = await conn.fetchval(
            "INSERT INTO programs (workspace_id, name, url, cookie_window_days)"
            " VALUES ($1, 'Main', 'https://yoursite.com/', 60) RETURNING id",
            ws["workspace_id"],
        )
        affiliate = await conn.fetchval(
            "INSERT INTO affiliates (workspace_id, program_id, external_id, name, email)"
            " VALUES ($1, $2, 'user_123', 'Alex', 'alex@example.com') RETURNING id",
            ws["workspace_id"],
            program,
        )
        codes = [f"BENCH{i:03d}" for i in range(LINKS)]
        await conn.executemany(
            "INSERT INTO links (workspace_id, program_id, affiliate_id, code, url, domain)"
            " VALUES ($1, $2, $3, $4, 'https://yoursite.com/pricing', 'yoursite.com')",
            [(ws["workspace_id"], program, affiliate, c) for c in codes],
        )
    finally:
        await conn.close()
    world = World(server_url, database, ws["workspace_id"], ws["api_key"], codes, [])
    world.click_ids = [clicks.mint(uuid7()) for _ in range(256)]
    server = await asyncpg.connect(with_database(server_url, "postgres"))
    try:
        await server.execute(f'CREATE DATABASE "{world.template}" TEMPLATE "{database}"')
    finally:
        await server.close()
    return world


async def warm(world: World, redis: Redis, keys: Keys, database: str | None = None) -> None:
    """The link cache (and the click cache for seed 004) under ``keys``' prefix."""
    pool = await create_pg_pool(Settings(database_url=world.url(database)), min_size=1, max_size=1)
    try:
        await links.refresh_all(pool, redis, keys)
    finally:
        await pool.close()
    pipe = redis.pipeline(transaction=False)
    now = time.time_ns() // 1_000_000
    for i, cid in enumerate(world.click_ids):
        ref = clicks.ClickRef(cid, world.codes[i % len(world.codes)], world.workspace_id, cid, now)
        pipe.execute_command(*ref.cache_command(keys, 86400))
    await pipe.execute()


async def copy_database(world: World, name: str) -> str:
    """A fresh copy of the world's database (no events); the source must have no sessions."""
    conn = await asyncpg.connect(world.url("postgres"))
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{world.template}"')
    finally:
        await conn.close()
    return name


async def drop_databases(server_url: str, prefix: str) -> None:
    conn = await asyncpg.connect(with_database(server_url, "postgres"))
    try:
        names = await conn.fetch("SELECT datname FROM pg_database WHERE datname LIKE $1", prefix + "%")
        for r in names:
            await conn.execute(f'DROP DATABASE IF EXISTS "{r["datname"]}" WITH (FORCE)')
    finally:
        await conn.close()


async def delete_keys(redis: Redis, prefix: str) -> int:
    n = 0
    async for key in redis.scan_iter(match=prefix + "*", count=1000):
        n += await redis.unlink(key)
    return n


def new_suffix() -> str:
    return secrets.token_hex(4)


def mixed(world: World, n: int, rng: random.Random) -> list[Envelope]:
    """Clicks (seed 002 browsers with bots, seed 000, batch), leads, conversions."""
    out: list[Envelope] = []
    ws = world.workspace_id
    run = secrets.token_hex(3)  # leads and conversions dedupe per run only
    for i in range(n):
        code = rng.choice(world.codes)
        visitor = f"v{rng.randrange(5000)}"
        ip, ua = client_ip(i), rng.choice(UAS)
        kind = rng.random()
        if kind < 0.5:
            cid = clicks.mint(eid := uuid7())
            payload: dict[str, Any] = {
                "code": code,
                "click_id": cid,
                "visitor_id": visitor,
                "page_url": "https://yoursite.com/pricing",
                "referrer": REFERRER,
            }
            out.append(
                Envelope(
                    type=EventType.CLICK,
                    dialect=Dialect.AFFITOR,
                    workspace_id=ws,
                    ip=ip,
                    user_agent=ua,
                    payload=payload,
                    event_id=eid,
                )
            )
        elif kind < 0.7:
            out.append(
                Envelope(
                    type=EventType.CLICK,
                    dialect=Dialect.BIORE,
                    workspace_id=ws,
                    ip=ip,
                    user_agent=ua,
                    payload={"code": code, "referrer": "https://bio.re/alex"},
                )
            )
        elif kind < 0.8:
            out.append(
                Envelope(
                    type=EventType.CLICK,
                    dialect=Dialect.NATIVE,
                    workspace_id=ws,
                    ip=ip,
                    user_agent=ua,
                    payload={"code": code, "visitor_id": visitor, "match": "cookie"},
                )
            )
        elif kind < 0.95:
            payload = {
                "code": code,
                "click_id": rng.choice(world.click_ids),
                "visitor_id": visitor,
                "name": "Sign Up",
                "external_id": f"{run}-u{i}",
                "email": f"u{i}@example.com",
            }
            out.append(Envelope(type=EventType.LEAD, dialect=Dialect.REFPORT, workspace_id=ws, ip=ip, payload=payload))
        else:
            payload = {"code": code, "visitor_id": visitor, "dedupe": f"{code}:{run}-{i}"}
            out.append(Envelope(type=EventType.CONVERSION, dialect=Dialect.BRICQS, workspace_id=ws, payload=payload))
    return out


async def fill(redis: Redis, keys: Keys, envelopes: list[Envelope]) -> None:
    """Append to the streams as the edge would, with the consumer group created at 0."""
    for stream in keys.streams:
        await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    for start in range(0, len(envelopes), 5000):
        pipe = redis.pipeline(transaction=False)
        for e in envelopes[start : start + 5000]:
            pipe.xadd(keys.stream_for(e.payload["code"]), wire.to_entry_dict(e))  # type: ignore[arg-type]
        await pipe.execute()


async def backlog(redis: Redis, keys: Keys) -> tuple[int, int]:
    """(entries not yet delivered to the group + delivered but not acked, entries read)."""
    left = read = 0
    for stream in keys.streams:
        for g in await redis.xinfo_groups(stream):
            name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
            if name == GROUP:
                lag = g.get("lag")
                if lag is None:  # Redis cannot say (entries deleted past the group): count them
                    lag = await _undelivered(redis, stream, g["last-delivered-id"])
                left += int(lag) + int(g["pending"])
                read += int(g.get("entries-read") or 0)
    return left, read


async def _undelivered(redis: Redis, stream: str, last: bytes | str) -> int:
    """Entries of ``stream`` after ``last``, counted a page at a time."""
    after = last.decode() if isinstance(last, bytes) else last
    n = 0
    while page := await redis.xrange(stream, min=f"({after}", max="+", count=10_000):
        n += len(page)
        sid = page[-1][0]
        after = sid.decode() if isinstance(sid, bytes) else sid
    return n


def dumps(v: Any) -> str:
    return orjson.dumps(v).decode()
