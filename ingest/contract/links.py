"""The link cache in Redis: what the edge knows about a referral code without Postgres.

``{prefix}:link:{code}`` holds ``<version>|<json>`` (the link with its program's cookie
window and attribution, and its affiliate's external id), or ``0|-`` for a code known not
to exist. Every writer goes through one script that only replaces an entry with one at
least as new, so a slow reader can never put back what a newer write replaced. The version
is Postgres's sequence ``link_cache_version``, never a clock (docs/guarantees.md, one clock decides: ``now()``
can step back): each change the cached link shows (of the link, its workspace's origins,
its program's window or attribution, its affiliate's external id) takes the sequence's next
value, and the link's version is the greatest of its rows' (schema.sql, version 6).
Writers:
- the management side after each commit (``put``);
- the workers' periodic refresh of every link, which then sets ``{prefix}:links:warm``;
- the edge itself, after a Postgres fallback on a miss while the cache is not warm.
Once warm, a miss means "no such code" and Postgres is not asked.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from typing import Any, Final

import asyncpg
import orjson
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError

from ingest.contract.connections import REDIS_ERRORS, Command, Redis, client_fault
from ingest.contract.keys import Keys

log = structlog.get_logger("ingest.links")

NEGATIVE_TTL_S: Final = 300
WARM_TTL_S: Final = 3600  # the refresh runs far more often; a lapse only costs fallbacks
_MISSING: Final = b"-"

# KEYS[1] the entry; ARGV[1] version, ARGV[2] value, ARGV[3] ttl seconds (0: none)
SET_IF_NEWER: Final = """
local old = redis.call('GET', KEYS[1])
if old then
  local v = tonumber(string.match(old, '^(%d+)|'))
  if v and v > tonumber(ARGV[1]) then return 0 end
end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2], 'EX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2])
end
return 1
"""

LINK_SELECT: Final = """
SELECT l.id, l.workspace_id, l.program_id, l.affiliate_id, a.external_id AS affiliate_external_id,
       l.code, l.url, l.domain, l.status, p.cookie_window_days, p.attribution,
       greatest(l.cache_version, w.cache_version, p.cache_version, a.cache_version) AS version, w.allowed_origins
FROM links l
JOIN workspaces w ON w.id = l.workspace_id
LEFT JOIN programs p ON p.id = l.program_id
LEFT JOIN affiliates a ON a.id = l.affiliate_id
"""


@dataclass(frozen=True, slots=True)
class LinkInfo:
    id: str
    workspace_id: str
    program_id: str | None
    affiliate_id: str | None
    affiliate_external_id: str | None
    code: str
    url: str
    domain: str | None
    status: str
    cookie_window_days: int
    attribution: str
    version: int = 0
    allowed_origins: tuple[str, ...] = ()  # the workspace's; empty: any origin

    def allows_origin(self, origin: str | None) -> bool:
        """Browsers send Origin on cross-origin requests; servers usually send none."""
        return not self.allowed_origins or origin is None or origin in self.allowed_origins

    @property
    def active(self) -> bool:
        return self.status == "active"

    @property
    def configured(self) -> bool:
        """Seed 002 refuses clicks on a link that lost its partner or program."""
        return self.program_id is not None and self.affiliate_id is not None

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_record(cls, r: Any) -> LinkInfo:
        def s(v: Any) -> str | None:
            return None if v is None else str(v)

        return cls(
            id=str(r["id"]),
            workspace_id=str(r["workspace_id"]),
            program_id=s(r["program_id"]),
            affiliate_id=s(r["affiliate_id"]),
            affiliate_external_id=r["affiliate_external_id"],
            code=r["code"],
            url=r["url"],
            domain=r["domain"],
            status=r["status"],
            cookie_window_days=r["cookie_window_days"] or 30,
            attribution=r["attribution"] or "last_click",
            version=r["version"] or 0,
            allowed_origins=tuple(r["allowed_origins"] or ()),
        )


class Missing:
    """The code is known not to exist (negative cache entry)."""


MISSING: Final = Missing()


def decode(raw: object) -> LinkInfo | Missing | None:
    """None: not cached (or unreadable). MISSING: known unknown. Else the link."""
    if not isinstance(raw, bytes):
        return None
    _, _, body = raw.partition(b"|")
    if body == _MISSING:
        return MISSING
    try:
        d = orjson.loads(body)
        d["allowed_origins"] = tuple(d.get("allowed_origins") or ())
        return LinkInfo(**d)
    except (orjson.JSONDecodeError, TypeError, AttributeError):
        return None


def _entry(keys: Keys, item: LinkInfo | str) -> tuple[str, int, bytes, int]:
    """(key, version, value, ttl) for a link, or for a code known not to exist."""
    if isinstance(item, LinkInfo):
        return keys.link(item.code), item.version, item.encode(), 0
    return keys.link(item), 0, _MISSING, NEGATIVE_TTL_S


def cache_command(keys: Keys, sha: str, item: LinkInfo | str) -> tuple[Any, ...]:
    """The SET_IF_NEWER call for ``item``, to send through a micro-batcher."""
    return ("EVALSHA", sha, 1, *_entry(keys, item))


async def _write(redis: Redis, keys: Keys, items: list[LinkInfo | str]) -> None:
    if not items:
        return
    sha = await redis.script_load(SET_IF_NEWER)
    pipe = redis.pipeline(transaction=False)
    for item in items:
        # a raw command: redis-py's cluster pipeline refuses its evalsha() helper, yet routes
        # EVALSHA by its one key like any other command
        pipe.execute_command("EVALSHA", sha, 1, *_entry(keys, item))
    await pipe.execute()


async def put(redis: Redis, keys: Keys, *links: LinkInfo) -> None:
    """After a commit: the edge sees the new or changed link at once. A connection redis-py
    closed under the write (a RuntimeError or AttributeError of its own: Redis killed
    mid-command) is raised as the outage it is, a ``ConnectionError``: a management write
    that committed was answered 500 for it (the generative test's seed 2026520494)."""
    try:
        await _write(redis, keys, list(links))
    except (RuntimeError, AttributeError) as exc:
        if not client_fault(exc):
            raise
        raise RedisConnectionError(f"a connection closed under the link cache's write: {exc!r}") from exc


async def put_committed(redis: Redis, keys: Keys, *links: LinkInfo) -> None:
    """After a management write's commit: ``put``, and where Redis cannot take it now, the
    same write retried in the background. The commit stands, so its request is answered as
    done, never refused for its cache: a 503 for a link that exists would be a refusal that
    moved something, and its retry a 409. Versions decide: a late retry never overwrites a
    newer change. Until it lands (or the workers' refresh writes every link), the edge asks
    Postgres for a code it does not find, or, once the cache is warm, takes it as unknown."""
    try:
        await put(redis, keys, *links)
    except REDIS_ERRORS as exc:
        log.warning("link_cache.write_deferred", codes=[link.code for link in links], error=exc)
        task = asyncio.create_task(_put_later(redis, keys, list(links)), name="link-cache-retry")
        _RETRYING.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(_RETRYING.discard)


_RETRYING: set[asyncio.Task[None]] = set()
RETRY_FOR_S = 600.0  # then the workers' refresh (every 10 minutes) has written it anyway


async def _put_later(redis: Redis, keys: Keys, links: list[LinkInfo]) -> None:
    loop = asyncio.get_running_loop()
    until, delay = loop.time() + RETRY_FOR_S, 0.1
    while True:
        await asyncio.sleep(delay)
        try:
            await put(redis, keys, *links)
        except REDIS_ERRORS as exc:
            if loop.time() > until:
                log.warning("link_cache.write_given_up", codes=[link.code for link in links], error=exc)
                return
            delay = min(5.0, delay * 2)
        else:
            log.info("link_cache.write_done", codes=[link.code for link in links])
            return


async def put_missing(redis: Redis, keys: Keys, *codes: str) -> None:
    await _write(redis, keys, list(codes))


def deleted_commands(keys: Keys, versions: dict[str, int]) -> list[Command]:
    """``put_deleted``'s writes as commands, each script sent whole (``EVAL``)."""
    return [("EVAL", SET_IF_NEWER, 1, keys.link(code), v, _MISSING, NEGATIVE_TTL_S) for code, v in versions.items()]


async def put_deleted(redis: Redis, keys: Keys, versions: dict[str, int]) -> None:
    """Links deleted (with their workspace): each code known not to exist, at a version
    newer than its link's entry (``versions``: code -> a version drawn from
    ``link_cache_version`` at the deletion), so the entry is replaced, not kept as newer."""
    if not versions:
        return
    sha = await redis.script_load(SET_IF_NEWER)
    pipe = redis.pipeline(transaction=False)
    for code, version in versions.items():
        pipe.execute_command("EVALSHA", sha, 1, keys.link(code), version, _MISSING, NEGATIVE_TTL_S)
    await pipe.execute()


async def fetch(conn: asyncpg.Connection | asyncpg.Pool, code: str) -> LinkInfo | None:
    row = await conn.fetchrow(LINK_SELECT + " WHERE l.code = $1", code)
    return LinkInfo.from_record(row) if row else None


async def refresh_all(pool: asyncpg.Pool, redis: Redis, keys: Keys, *, chunk: int = 2000, warm: bool = True) -> int:
    """Write every link of ``pool``'s database into the cache, then mark it warm (unless
    ``warm`` is False: other shards' links are still to come). The number of links."""
    n = 0
    batch: list[LinkInfo] = []
    async with pool.acquire() as conn, conn.transaction():
        async for row in conn.cursor(LINK_SELECT + " ORDER BY l.code", prefetch=chunk):
            batch.append(LinkInfo.from_record(row))
            if len(batch) >= chunk:
                await put(redis, keys, *batch)
                n += len(batch)
                batch.clear()
    await put(redis, keys, *batch)
    n += len(batch)
    if warm:
        await mark_warm(redis, keys)
    return n


async def mark_warm(redis: Redis, keys: Keys) -> None:
    """The cache holds every link: an edge that misses a code there answers "unknown"."""
    await redis.set(keys.links_warm, b"1", ex=WARM_TTL_S)
