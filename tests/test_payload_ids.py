"""A click's payload is stored without the ids its columns hold (schema 20,
``workers.consumer.event_row.row_payload``) and read back whole by ``event_payload``
(schema.sql), whatever a careless client sent as those ids: a click id refstream minted, one
in capitals, one of another form, a number; a visitor id, an empty one, a JSON null, a
number; with a referrer of text or of another type, or none."""

from __future__ import annotations

import itertools
from typing import Any

import asyncpg
import orjson

from ingest.contract import clicks
from ingest.contract.events import uuid7
from workers.consumer.event_row import row_payload

from ._world import World

_ABSENT = object()
_MINTED = clicks.mint(uuid7())
CLICK_IDS = (_ABSENT, _MINTED, _MINTED.upper().replace("CLK_", "clk_"), "clk_1234", "not-a-click", 42, None)
VISITOR_IDS = (_ABSENT, "v-1", "", None, 7, "erased-0123456789abcdef")
REFERRERS = (_ABSENT, "https://blog.example/post", 5)
# the row's columns as the worker fills them (rows.build), and the read GET /v1/events makes
_READ = "SELECT event_payload($1::text::jsonb, $2::uuid, $3::text, $4::uuid, $5::text)::text"


def _column(value: Any) -> str | None:
    return value if isinstance(value, str) else None


async def test_a_clicks_payload_reads_back_as_it_was_sent(pg: asyncpg.Pool, world: World) -> None:
    code, link_id = world.link["code"], world.link["id"]
    cases = 0
    for click_id, visitor_id, referrer in itertools.product(CLICK_IDS, VISITOR_IDS, REFERRERS):
        sent: dict[str, Any] = {"code": code, "page_url": "https://shop.example/"}
        for key, value in (("click_id", click_id), ("visitor_id", visitor_id), ("referrer", referrer)):
            if value is not _ABSENT:
                sent[key] = value
        click = clicks.parse(click_id) if isinstance(click_id, str) else None
        visitor = _column(visitor_id)
        stored = row_payload(sent, code, click=click, visitor=visitor)
        if click_id == _MINTED:
            assert "click_id" not in stored  # stored once: by its column
        if isinstance(visitor_id, str):
            assert "visitor_id" not in stored
        read = await pg.fetchval(_READ, orjson.dumps(stored).decode(), link_id, _column(referrer), click, visitor)
        assert orjson.loads(read) == sent, (sent, stored)
        cases += 1
    assert cases == len(CLICK_IDS) * len(VISITOR_IDS) * len(REFERRERS)
