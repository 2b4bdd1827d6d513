"""The link cache's version is a Postgres sequence, not a clock: a change made while
Postgres's clock stood earlier than at the change before it still wins, and a slow reader's
older copy never overwrites it (docs/guarantees.md: one clock decides)."""

from __future__ import annotations

from typing import Any

import asyncpg

from ingest.contract import links
from ingest.contract.keys import Keys

from ._world import make_world


async def cached(redis: Any, keys: Keys, code: str) -> links.LinkInfo:
    found = links.decode(await redis.get(keys.link(code)))
    assert isinstance(found, links.LinkInfo)
    return found


async def test_a_change_made_while_the_clock_stood_earlier_wins_and_stays(
    pg: asyncpg.Pool, redis: Any, keys: Keys
) -> None:
    await make_world(pg, redis, keys, code="A")
    before = await links.fetch(pg, "A")  # a slow reader's copy: active
    assert before is not None and before.active
    # the link deactivated while Postgres's clock stood an hour back (a step after an NTP
    # correction, a promoted standby behind): updated_at, and so now(), went backwards
    await pg.execute(
        "UPDATE links SET status = 'inactive', updated_at = updated_at - interval '1 hour' WHERE code = 'A'"
    )
    after = await links.fetch(pg, "A")
    assert after is not None
    await links.put(redis, keys, after)
    assert not (await cached(redis, keys, "A")).active  # the newer change is in the cache
    await links.put(redis, keys, before)  # the slow reader writes its older copy last
    assert not (await cached(redis, keys, "A")).active  # and it did not overwrite the newer one
    assert after.version > before.version


async def version(pg: asyncpg.Pool, code: str) -> int:
    """The cache version of the link ``code``, which the test has made."""
    link = await links.fetch(pg, code)
    assert link is not None
    return link.version


async def test_a_change_of_what_the_link_shows_from_its_program_or_workspace_moves_its_version(
    pg: asyncpg.Pool, redis: Any, keys: Keys
) -> None:
    world = await make_world(pg, redis, keys, code="A")
    v0 = await version(pg, "A")
    await pg.execute("UPDATE links SET clicks = clicks + 1 WHERE code = 'A'")  # a counter: not in the cache
    assert await version(pg, "A") == v0
    await pg.execute("UPDATE programs SET cookie_window_days = 7 WHERE id = $1", world.program_id)
    v1 = await version(pg, "A")
    await pg.execute("UPDATE workspaces SET allowed_origins = '{https://a.test}' WHERE id = $1", world.workspace_id)
    v2 = await version(pg, "A")
    await pg.execute("UPDATE affiliates SET external_id = 'user_9' WHERE id = $1", world.affiliate_id)
    v3 = await version(pg, "A")
    assert v0 < v1 < v2 < v3
    await links.refresh_all(pg, redis, keys)
    now = await cached(redis, keys, "A")
    assert (now.cookie_window_days, now.allowed_origins, now.affiliate_external_id) == (
        7,
        ("https://a.test",),
        "user_9",
    )
