"""arq's connection under refstream's key prefix.

arq names its own keys from module constants (``arq:job:``, ``arq:in-progress:``,
``arq:result:``, ``arq:retry:``, ``arq:abort``), imported by name into ``arq.worker``,
``arq.jobs`` and ``arq.connections``; only the queue and health-check keys are settings.
So two deployments sharing a Redis would share those keys: the same cron job id in both
(``cron:refresh_links:<time>``) would run in one of them only.

``PrefixedArqRedis`` moves them under ``{prefix}:`` where they meet Redis: every command
arq sends goes through this client (the worker's pool, the ``Job`` objects it makes, and
the pipelines of both), and each key argument that starts with ``arq:`` gets the prefix.
That keeps all of arq's code as it is and holds no global state, so processes (and tests)
with different prefixes can share an interpreter. Rejected: subclassing ``Worker`` and
``ArqRedis`` to override every method that builds a key (a copy of most of arq's
``run_job``, ``finish_job``, ``start_jobs`` and ``enqueue_job``), and assigning the module
constants at start-up (one prefix per process, invisible to readers, and wrong for any
pool made before).

Which argument is a key depends on the command; arq 0.28 sends the commands in the two
tables below, and refstream's own script on arq's keys (``webhooks.enqueue``) takes its
keys as scripts do (the third). A command outside them that carries an ``arq:`` argument
raises ``UnprefixedKey`` rather than writing beside another deployment's keys: a newer arq
that sends one fails its first job, loudly (``tests/test_arq_prefix.py`` runs every path).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.asyncio.client import Pipeline

from ingest.contract.errors import Misconfigured
from ingest.contract.keys import Keys
from ingest.contract.sentinel_url import sentinel_target
from ingest.contract.settings import Settings

_ARQ = "arq:"
# commands whose first argument is their only key
_FIRST_KEY = frozenset(
    "GET SET SETEX PSETEX INCR INCRBY EXPIRE PEXPIRE TTL PTTL TYPE ZADD ZREM ZRANGE ZRANGEBYSCORE"
    " ZREMRANGEBYSCORE ZSCORE ZCARD".split()
)
# commands whose every argument is a key
_ALL_KEYS = frozenset("DEL UNLINK EXISTS WATCH MGET".split())
# scripts (refstream's own, on arq's keys: webhooks.enqueue): name, script, key count, keys, args
_SCRIPTS = frozenset("EVAL EVALSHA".split())


class UnprefixedKey(Misconfigured, RuntimeError):
    """arq sent a command this client cannot put under the prefix (a newer arq?)."""


def _is_arq(value: Any) -> bool:
    if isinstance(value, bytes):
        return value.startswith(b"arq:")
    return isinstance(value, str) and value.startswith(_ARQ)


def _under(prefix: str, key: Any) -> Any:
    if not _is_arq(key):
        return key  # ours already (the queue, the health check), or not a key
    return f"{prefix}:".encode() + key if isinstance(key, bytes) else f"{prefix}:{key}"


def prefixed(prefix: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """``args`` of one command (its name first) with arq's keys under ``prefix``."""
    name = str(args[0]).upper()
    if name in _FIRST_KEY and len(args) > 1:
        return (args[0], _under(prefix, args[1]), *args[2:])
    if name in _ALL_KEYS:
        return (args[0], *(_under(prefix, a) for a in args[1:]))
    if name in _SCRIPTS and len(args) > 2:
        n = int(args[2])
        return (*args[:3], *(_under(prefix, k) for k in args[3 : 3 + n]), *args[3 + n :])
    if any(_is_arq(a) for a in args[1:]):
        raise UnprefixedKey(f"arq sent {name} with an arq: key; add the command to workers/host/arq_redis.py")
    return args


class PrefixedPipeline(Pipeline):
    """A pipeline (MULTI/EXEC, WATCH) that sends arq's keys under the prefix."""

    def __init__(self, key_prefix: str, *args: Any) -> None:
        self.key_prefix = key_prefix
        super().__init__(*args)

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        return super().execute_command(*prefixed(self.key_prefix, args), **kwargs)


class PrefixedArqRedis(ArqRedis):
    """``ArqRedis`` whose commands, and whose pipelines', keep arq's keys under ``key_prefix``."""

    def __init__(self, *args: Any, key_prefix: str, **kwargs: Any) -> None:
        self.key_prefix = key_prefix
        super().__init__(*args, **kwargs)

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        send: Callable[..., Awaitable[Any]] = super().execute_command  # untyped in redis-py
        if str(args[0]).upper() == "KEYS" and _is_arq(args[1]):
            # all_job_results cuts arq's own prefix off the names: give them back without ours
            found = await send("KEYS", _under(self.key_prefix, args[1]), **options)
            cut = len(self.key_prefix) + 1
            return [k[cut:] for k in found]
        return await send(*prefixed(self.key_prefix, args), **options)

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> PrefixedPipeline:
        return PrefixedPipeline(self.key_prefix, self.connection_pool, self.response_callbacks, transaction, shard_hint)


def redis_settings(settings: Settings, *, wait: bool = False) -> RedisSettings:
    """arq's own Redis (``REFSTREAM_ARQ_REDIS_URL``, else ``REDIS_URL``); ``wait``: retry a
    refused connection for as long as it takes, as a worker starting before Redis must.

    A ``redis+sentinel://`` URL gives arq's own Sentinel mode: its pool asks the sentinels
    where the primary is at each connect, and drops a connection that meets READONLY."""
    target = sentinel_target(settings.arq_url)
    if target is None:
        rs = RedisSettings.from_dsn(settings.arq_url)
    else:
        rs = RedisSettings(
            host=list(target.sentinels),
            sentinel=True,
            sentinel_master=target.master,
            database=target.db,
            username=target.username,
            password=target.password,
        )
    if wait:
        rs.conn_retries, rs.conn_retry_delay = 1_000_000, 2
    return rs


async def connect_arq(settings: Settings, *, wait: bool = False) -> PrefixedArqRedis:
    """The pool to enqueue jobs with (and the worker's own): JSON jobs, never pickle, on
    ``{prefix}:arq:queue``, every arq key under ``{prefix}:``. Close it with ``aclose()``."""
    keys = Keys(settings.stream_prefix, settings.partitions)
    return wrap(
        await create_pool(
            redis_settings(settings, wait=wait),
            job_serializer=orjson.dumps,
            job_deserializer=orjson.loads,
            default_queue_name=keys.arq_queue,
        ),
        settings.stream_prefix,
    )


def wrap(pool: ArqRedis, key_prefix: str) -> PrefixedArqRedis:
    """``pool``'s connections and settings, with arq's keys under ``key_prefix``; closing
    it closes them. (arq's ``create_pool`` makes a plain ``ArqRedis`` and waits for Redis
    as its settings say, so it is used first.)"""
    client = PrefixedArqRedis(
        connection_pool=pool.connection_pool,
        job_serializer=pool.job_serializer,
        job_deserializer=pool.job_deserializer,
        default_queue_name=pool.default_queue_name,
        expires_extra_ms=pool.expires_extra_ms,
        key_prefix=key_prefix,
    )
    client.auto_close_connection_pool = True  # as create_pool's own client would
    return client
