"""A click's referrer domain read back from its ``referrer`` (schema 26): Postgres's
``referrer_domain(text)`` and ``ingest.contract.referrers.derived`` agree on every text;
whatever a client sends as a referrer, GET /v1/events shows the worker's domain, before and
after the person's erasure (which clears the referrer), and the row keeps a copy only where
the derivation would not give it."""

from __future__ import annotations

import random
from typing import Any

import asyncpg

from ingest.contract import erasure as ledger
from ingest.contract import referrers
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.manage import manage
from ingest.privacy import erasure as pg_erasure
from workers.consumer.enrich import Enricher, _referrer_domain
from workers.consumer.store import write_batch

from ._world import BROWSER, World

# what careless clients and odd browsers send: each a member of a kind the pattern must
# read as the worker does, or leave to the row
ODD = [
    "https://bio.re/alex",
    "https://www.Example.COM/path?q=1#x",
    "http://news.ycombinator.com/item?id=1",
    "https://user:pw@Shop.Example.co.uk:8443/",
    "https://www.example.com./",
    "https://wwwexample.com/",
    "https://www.www.example.com/",
    "https://www/",
    "https://www./",
    "https://www",
    "android-app://com.google.android.gm/",
    "https://[2001:db8::1]/x",
    "https://[2001:db8::1/x",
    "example.com/no-scheme",
    "not a url",
    "https://",
    "",
    " https://lead.example/",
    "https://trail.example/\n",
    "https://trail.example\n",
    "https://tab.exa\tmple/",
    "HTTPS://upper.example/",
    "https://x.example:99999/",
    "https://x.example:8080",
    "https://x.example:port/",
    "https://x..example/",
    "https://.x.example/",
    "https://-x.example/",
    "https://x_y.example/",
    "https://bücher.example/",
    "https://xn--bcher-kva.example/",
    "https://x.example?q=1",
    "https://x.example#top",
    "https://x.example\\evil.example/",
    "https://x.example%2F/",
    "ftp://files.example/",
    "https://a.example/" + "p" * 3000,
]
_PIECES = [
    "http",
    "https",
    "HTTP",
    "://",
    ":/",
    "www.",
    "WWW.",
    "a",
    "b-c",
    "x1",
    ".",
    "..",
    "-",
    "_",
    ":",
    "8080",
    "99999",
    "@",
    "u:p@",
    "/",
    "?",
    "#",
    "[",
    "]",
    "::1",
    " ",
    "\n",
    "\t",
    "é",
    "%2e",
    "\\",
    "com",
    "",
]


def _careless(rnd: random.Random, n: int) -> list[str]:
    """``n`` texts of URL pieces in any order: schemes, hosts, ports, users, brackets,
    spaces and newlines where they do not belong."""
    return ["".join(rnd.choice(_PIECES) for _ in range(rnd.randrange(1, 12))) for _ in range(n)]


async def test_postgres_and_python_derive_the_same_domain_from_any_text(pg: asyncpg.Pool) -> None:
    texts = ODD + _careless(random.Random(), 5000)
    got = dict(await pg.fetch("SELECT x, referrer_domain(x) FROM unnest($1::text[]) AS x", texts))
    wrong = [(t, got[t], referrers.derived(t)) for t in texts if got[t] != referrers.derived(t)]
    assert not wrong, wrong[:5]
    # and schema.sql's function runs the module's pattern
    defined = await pg.fetchval("SELECT prosrc FROM pg_proc WHERE proname = 'referrer_domain'")
    assert referrers.PATTERN in defined


def _click(world: World, referrer: Any, i: int) -> Envelope:
    payload = {"code": world.link["code"], "visitor_id": f"v{i}", "referrer": referrer}
    return Envelope(EventType.CLICK, Dialect.AFFITOR, payload, world.workspace_id, ip="81.2.69.160", user_agent=BROWSER)


async def test_every_referrer_reads_back_as_the_workers_domain_before_and_after_an_erasure(
    pg: asyncpg.Pool, world: World
) -> None:
    texts = ODD + _careless(random.Random(), 200)
    events = [_click(world, t, i) for i, t in enumerate(texts)]
    # a person: a click of theirs and their lead, erased below
    person = _click(world, "https://www.person.example/from", len(texts))
    lead = {"code": world.link["code"], "visitor_id": person.payload["visitor_id"], "external_id": "cus_r"}
    lead_event = Envelope(EventType.LEAD, Dialect.REFPORT, lead | {"name": "Sign Up"}, world.workspace_id)
    assert (await write_batch(pg, [*events, person, lead_event], Enricher())).inserted == len(events) + 2
    want = {str(e.event_id): _referrer_domain(e.payload["referrer"]) for e in [*events, person]}

    async def read() -> dict[str, Any]:
        async with pg.acquire() as conn:
            rows = await manage.list_events(conn, world.workspace_id, link_id=None, type_="click", limit=1000)
        return {r["event_id"]: r["enrichment"]["referrer_domain"] for r in rows}

    assert await read() == want
    # the row holds a copy only where Postgres would not derive the worker's domain
    kept = dict(
        await pg.fetch(
            "SELECT event_id::text, enrichment ? 'referrer_domain' FROM events WHERE workspace_id = $1 AND type = 1",
            world.workspace_id,
        )
    )
    copies = {
        str(e.event_id) for e in [*events, person] if referrers.derived(e.payload["referrer"]) != want[str(e.event_id)]
    }
    assert copies and {k for k, v in kept.items() if v} == copies
    assert kept[str(events[0].event_id)] is None  # bio.re: no enrichment left in the row at all

    ledger.forget_salt()  # the process's salt is this database's for the erasure, then no one's
    try:
        await pg_erasure.erase(pg, world.workspace_id, "cus_r", by="test", archive_days=30)
    finally:
        ledger.forget_salt()
    assert await pg.fetchval("SELECT referrer FROM events WHERE event_id = $1", person.event_id) is None
    assert await read() == want
