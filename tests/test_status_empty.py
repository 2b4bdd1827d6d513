"""`refstream status` on an empty partition: nothing is held back there, so it has no
"oldest needed" age (it showed 498727.1h: the age of stream id 0); and a group that read
nothing yet holds back from the oldest entry there is, not from 1970."""

from __future__ import annotations

import re
import time
from typing import Any

from ingest.contract.keys import GROUP, Keys
from ingest.contract.wire import FIELD

from ._procs import Procs
from .test_status import _status


async def test_an_empty_partition_has_no_age_and_a_group_that_read_nothing_holds_from_the_first_entry(
    procs: Procs, redis: Any, keys: Keys
) -> None:
    empty, held = keys.streams[0], keys.streams[1]
    await redis.xgroup_create(empty, GROUP, id="0", mkstream=True)  # a worker's group, nothing appended yet
    now_ms = int(time.time() * 1000)
    for i in range(3):
        await redis.xadd(held, {FIELD: b"x"}, id=f"{now_ms - 120_000 + i}-0")
    await redis.xgroup_create(held, "archive", id="0")  # it has read nothing yet
    env = {"REFSTREAM_STREAM_RETENTION_S": "60"}  # the entries are two minutes old: past the retention

    _, snap = await _status(procs, "--json", "--max-dead", "10", **env)
    p0, p1 = snap["partitions"][:2]
    assert (p0["length"], p0["first_entry_age_s"], p0["trim_held_by"], p0["trim_held_age_s"]) == (0, None, None, None)
    assert (p1["trim_held_by"], p1["trim_held_entries"]) == ("archive", 3)
    assert 119 <= p1["trim_held_age_s"] < 200

    _, text = await _status(procs, "--max-dead", "10", **env)
    held_table = text.split("trim held back")[1].split("groups")[0]
    rows = [line for line in held_table.splitlines() if line.startswith("│")]
    assert len(rows) == 1 and "archive" in rows[0] and re.search(r"\b2\.\dm\b", rows[0]), held_table
    assert "498727" not in text
