"""A trim racing a replay loses nothing: whatever the trim removes between two pages of a
replay is read from the archive (issue 24, defect 7)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis as sync_redis

from ingest.contract.events import Dialect, Envelope, EventType, uuid7
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from workers.archive.archiver import Archiver
from workers.archive.store import open_store
from workers.ops.replay import Range, Source, replay

from ._world import make_world
from .test_replay import T0, append


def clicks(n: int) -> list[Envelope]:
    out = []
    for i in range(n):
        at = T0 + i * 1000
        payload = {"code": "A", "visitor_id": f"v{i}"}
        out.append(Envelope(EventType.CLICK, Dialect.AFFITOR, payload, event_id=uuid7(at), received_at_ms=at))
    return out


@pytest.mark.parametrize("trimmed", [30, 25], ids=["all-of-it", "part-of-it"])
async def test_a_trim_between_two_pages_of_a_replay_loses_nothing(
    settings: Settings, redis: Any, keys: Keys, pg: asyncpg.Pool, tmp_path: Path, trimmed: int
) -> None:
    settings = settings.model_copy(update={"archive_url": f"file://{tmp_path / 'archive'}"})
    await make_world(pg, redis, keys, code="A")
    ids = (await append(redis, keys, clicks(30)))[keys.stream_for("A")]
    store = open_store(settings)
    archiver = Archiver(settings, redis, store, name="a1")
    await archiver.run(drain=True)  # every entry in a segment, acked by the archive's group (the only one)
    assert archiver.totals.entries == 30
    stream = keys.stream_for("A")
    partition = keys.streams.index(stream)

    cut = ids[trimmed] if trimmed < len(ids) else f"{int(ids[-1].split('-')[0]) + 1}-0"
    pages: list[int] = []
    trimmer = sync_redis.Redis.from_url(settings.redis_url)

    def progress(done: int, total: int) -> None:
        pages.append(done)
        if done == 20:  # between pages 2 and 3: what the workers' trim does, exactly
            trimmer.xtrim(stream, minid=cut, approximate=False)

    try:
        result = await replay(
            Source(redis, store, keys.prefix),
            pg,
            keys,
            Range(partitions=(partition,)),
            batch_size=10,
            progress=progress,
        )
    finally:
        trimmer.close()
    assert await redis.xlen(stream) == 30 - trimmed  # the trim did happen, mid-replay
    assert 20 in pages
    assert (result.total("entries"), result.total("archived"), result.total("inserted")) == (30, trimmed - 20, 30)
    assert await pg.fetchval("SELECT count(*) FROM events") == 30
    assert await pg.fetchval("SELECT clicks FROM links WHERE code = 'A'") == 30
