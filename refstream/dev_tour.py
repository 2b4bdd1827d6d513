"""The file ``refstream dev`` writes for the README's tour: ``.refstream-dev.env``, in the
directory it runs in.

Shell ``export`` lines: where the ``refstream`` command is and the settings dev's own
processes run with (so ``refstream link show demo`` reads what they write), and what the
demo made: the edge's address, the demo link's code and ids, and two API keys made for
this run (scope ``track``; scopes ``read`` and ``write``). ``source .refstream-dev.env``
in another shell, and the tour's commands run as written. When dev stops, it removes the
file (unless another dev has written its own since) and revokes the two keys.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from ingest.contract.connections import REDIS_ERRORS, Redis, connect_redis
from ingest.contract.errors import NotFound
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.manage import admin

TOUR_FILE = ".refstream-dev.env"
KEY_NAME = "refstream dev tour"
_SCOPES = {"RS_KEY": ["track"], "RS_MANAGE_KEY": ["read", "write"]}
_SAID = {
    "RS_KEY": "scope track: the tracking routes (Affixo, Refport, the batch)",
    "RS_MANAGE_KEY": "scopes read and write: Bricqs' generate and stats, the management API",
    "RS_CONSOLE": "refstream console: its operator token is REFSTREAM_CONSOLE_TOKEN",
    "RS_UA": "a browser's User-Agent: curl's own is a bot's, and a bot's click counts apart",
}


@dataclass
class Tour:
    """What the tour needs that dev made: the demo link and this run's keys."""

    link: dict[str, Any]
    keys: dict[str, dict[str, Any]]  # RS_KEY, RS_MANAGE_KEY: create_key's answers

    @property
    def prefixes(self) -> list[str]:
        return [str(k["prefix"]) for k in self.keys.values()]


async def make_keys(conn: asyncpg.Connection, redis: Redis, keys: Keys, link: dict[str, Any]) -> Tour:
    """This run's two keys in the demo link's workspace."""
    made = {
        name: await admin.create_key(
            conn, redis, keys, workspace_id=str(link["workspace_id"]), scopes=scopes, name=KEY_NAME
        )
        for name, scopes in _SCOPES.items()
    }
    return Tour(link, made)


def lines(tour: Tour, *, edge: str, console: str, env: dict[str, str], bin_dir: Path | None, browser: str) -> list[str]:
    """The file's lines: comments, then one ``export`` per value."""
    values: list[tuple[str, str]] = []
    if bin_dir is not None:
        values.append(("PATH", f'{shlex.quote(str(bin_dir))}:"$PATH"'))
    connections = [(k, env[k]) for k in ("REDIS_URL", "DATABASE_URL") if env.get(k)]
    settings = sorted((k, v) for k, v in env.items() if k.startswith("REFSTREAM_"))
    link = tour.link
    demo = [
        ("RS_EDGE", edge),
        ("RS_CONSOLE", console),
        ("RS_CODE", str(link["code"])),
        ("RS_WORKSPACE_ID", str(link["workspace_id"])),
        ("RS_PROGRAM_ID", str(link["program_id"])),
        ("RS_AFFILIATE_ID", str(link["affiliate_id"])),
        ("RS_LINK_ID", str(link["id"])),
        *((name, str(key["api_key"])) for name, key in tour.keys.items()),
        ("RS_UA", browser),
    ]
    values += [(k, shlex.quote(v)) for k, v in [*connections, *settings, *demo]]
    return [
        f"# written by refstream dev (pid {os.getpid()}) for the README's tour: `source` it in another shell.",
        "# Removed, and its two API keys revoked, when that refstream dev stops.",
        *(f"export {k}={v}" + (f"  # {_SAID[k]}" if k in _SAID else "") for k, v in values),
    ]


def write(path: Path, text_lines: list[str]) -> None:
    """The file, readable by its owner only: it holds API keys."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(text_lines) + "\n")
    os.chmod(path, 0o600)  # it may have existed with a wider mode


def remove(path: Path) -> None:
    """The file, if it is still this process's (another dev may have written its own)."""
    try:
        first = path.read_text().partition("\n")[0]
    except OSError:
        return
    if f"(pid {os.getpid()})" in first:
        path.unlink(missing_ok=True)


async def revoke(settings: Settings, tour: Tour) -> None:
    """This run's keys, revoked (edges drop them within REFSTREAM_KEY_CACHE_S)."""
    conn = await asyncpg.connect(settings.database_url, timeout=5)
    redis = connect_redis(settings)
    try:
        for prefix in tour.prefixes:
            try:
                keys = Keys(settings.stream_prefix, settings.partitions)
                await admin.revoke_key(conn, redis, keys, prefix, replicas=settings.ack_replicas)
            except NotFound:  # revoked by hand meanwhile
                pass
    finally:
        await conn.close()
        await redis.aclose()


REVOKE_ERRORS = (*REDIS_ERRORS, asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
