"""The management API's data layer: programs, affiliates, links, and reads of events,
customers and stats, every query scoped to one workspace (another workspace's object is
"not found"). Link writes refresh the Redis link cache after their commit."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from ingest.contract import ids, link_keys, links
from ingest.contract.connections import Redis, write
from ingest.contract.errors import Conflict, NotFound
from ingest.contract.events import EventType
from ingest.contract.keys import Keys
from ingest.contract.urls import hostname
from ingest.edge.body import BodyError
from ingest.manage.admin import insert_link, readable_code


def as_uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound(f"{value!r} not found") from None


def row_json(row: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, uuid.UUID):
            v = str(v)
        elif hasattr(v, "isoformat"):
            v = v.isoformat()
        elif k == "ip" and v is not None:
            v = str(v)
        out[k] = v
    return out


async def create_program(conn: asyncpg.Connection, workspace_id: str, **fields: Any) -> dict[str, Any]:
    """A program and its milestones (seed 001's "refer 5 friends": thresholds on conversions)."""
    by_threshold = {m["threshold"]: m for m in fields.get("milestones") or []}
    milestones = [by_threshold[t] for t in sorted(by_threshold)]
    async with write(conn):
        row = await conn.fetchrow(
            "INSERT INTO programs (workspace_id, name, url, cookie_window_days, attribution)"
            " VALUES ($1, $2, $3, $4, $5)"
            " RETURNING id, workspace_id, name, url, cookie_window_days, attribution, created_at",
            workspace_id,
            fields["name"],
            fields.get("url"),
            fields["cookie_window_days"],
            fields["attribution"],
        )
        await conn.executemany(
            "INSERT INTO milestones (program_id, name, threshold) VALUES ($1, $2, $3)",
            [(row["id"], m["name"], m["threshold"]) for m in milestones],
        )
    return {**row_json(row), "milestones": [{"name": m["name"], "threshold": m["threshold"]} for m in milestones]}


async def create_affiliate(conn: asyncpg.Connection, workspace_id: str, **fields: Any) -> dict[str, Any]:
    program = as_uuid(fields["program_id"])
    if not await conn.fetchval("SELECT 1 FROM programs WHERE id = $1 AND workspace_id = $2", program, workspace_id):
        raise NotFound("program not found")
    try:
        row = await conn.fetchrow(
            "INSERT INTO affiliates (workspace_id, program_id, external_id, name, email) VALUES ($1, $2, $3, $4, $5)"
            " RETURNING id, workspace_id, program_id, external_id, name, email, created_at",
            workspace_id,
            program,
            fields["external_id"],
            fields.get("name"),
            fields.get("email"),
        )
    except asyncpg.UniqueViolationError:
        raise Conflict(f"affiliate {fields['external_id']!r} exists in this program") from None
    return row_json(row)


_LINK = (
    "SELECT id, workspace_id, program_id, affiliate_id, code, url, domain, status, clicks, unique_clicks,"
    " bot_clicks, leads, conversions, last_clicked_at, created_at, updated_at FROM links"
)


async def create_link(
    conn: asyncpg.Connection,
    redis: Redis,
    keys: Keys,
    workspace_id: str,
    claim: Callable[[str, str], Awaitable[bool]] | None = None,
    **f: Any,
) -> dict[str, Any]:
    async with write(conn):  # the answer and the cache entry read before the commit: see _link_written
        affiliate = await conn.fetchrow(
            "SELECT id, program_id, external_id FROM affiliates WHERE id = $1 AND workspace_id = $2",
            as_uuid(f["affiliate_id"]),
            workspace_id,
        )
        if affiliate is None:
            raise NotFound("affiliate not found")
        url = f["url"]
        for _ in range(10):
            code = f.get("code") or readable_code(affiliate["external_id"])
            try:
                async with conn.transaction():  # a savepoint: a taken code leaves the rest standing
                    link_id = await insert_link(
                        conn,
                        workspace_id=workspace_id,
                        program_id=affiliate["program_id"],
                        affiliate_id=affiliate["id"],
                        code=code,
                        url=url,
                        domain=f.get("domain"),
                        status=f.get("status") or "active",
                        claim=claim,
                    )
                break
            except asyncpg.UniqueViolationError:
                if f.get("code"):
                    raise Conflict(f"code {code!r} is taken") from None
        else:
            raise Conflict("no free code found")
        row, cached = await _link_read(conn, link_id)
    return await _link_written(redis, keys, row, cached)


async def update_link(
    conn: asyncpg.Connection, redis: Redis, keys: Keys, workspace_id: str, link_id: str, **f: Any
) -> dict[str, Any]:
    async with write(conn):
        row = await conn.fetchrow(
            "UPDATE links SET status = coalesce($3, status), url = coalesce($4, url),"
            " domain = CASE WHEN $4::text IS NULL THEN domain ELSE $5 END, updated_at = now()"
            " WHERE id = $1 AND workspace_id = $2 RETURNING id",
            as_uuid(link_id),
            workspace_id,
            f.get("status"),
            f.get("url"),
            hostname(f["url"]) if f.get("url") else None,
        )
        if row is None:
            raise NotFound("link not found")
        written, cached = await _link_read(conn, row["id"])
    return await _link_written(redis, keys, written, cached)


async def _link_read(conn: asyncpg.Connection, link_id: uuid.UUID) -> tuple[Any, links.LinkInfo | None]:
    """In the write's transaction: the answer's row and the cache entry. Nothing is asked of
    Postgres after the commit, so a write that committed is never answered 503 (a refusal
    that moved something, and its retry a 409): the generative test's seeds 1358087867 and
    216384081 had links stored after a 503, when Postgres went away between the two."""
    row = await conn.fetchrow(_LINK + " WHERE id = $1", link_id)
    return row, await links.fetch(conn, row["code"])


async def _link_written(redis: Redis, keys: Keys, row: Any, cached: links.LinkInfo | None) -> dict[str, Any]:
    if cached is not None:  # the edge sees a new or deactivated link at once; Redis down: retried
        await links.put_committed(redis, keys, cached)
    return row_json(row)


async def get_link(conn: asyncpg.Connection, workspace_id: str, link_id: str) -> dict[str, Any]:
    row = await conn.fetchrow(LINK_BY_ID, as_uuid(link_id), workspace_id)
    if row is None:
        raise NotFound("link not found")
    return row_json(row)


_EVENT_COLUMNS = (
    "event_id, type, link_id, program_id, affiliate_id, click_id, visitor_id, customer_external_id, name,"
    " dialect, test_mode, is_bot, bot_counted, received_at, processed_at, ip,"
    " event_user_agent(user_agent, agent_id) AS user_agent, referrer, country, asn,"
    " event_enrichment(enrichment, device_id, place_id, ip, country, asn, is_bot, referrer) AS enrichment,"
    " event_payload(payload, link_id, referrer, click_id, visitor_id) AS payload"
)
_TYPES = {"click": EventType.CLICK, "lead": EventType.LEAD, "conversion": EventType.CONVERSION}


def events_query(*, link: bool, type_: bool, clicks: bool = True) -> str:
    """GET /v1/events: a workspace's newest events first, optionally of one link and one type.
    One statement per combination of filters, never ``($2 IS NULL OR ...)``: a generic plan
    (a prepared statement's, after a few runs) could not use an index for that. Served by
    ``events_workspace_id``, each partition's scan in id order, merged, and stopped at the
    limit; a link's by ``events_link_key_received`` (schema 26) the same way, newest by
    received time (ties by id: an id is minted with its time, so the orders agree but where a
    producer set them apart; schema 19); a type other than click (``clicks`` False) by the partial
    ``events_workspace_nonclick``, which the planner may use only if the statement itself
    says ``type <> 1`` (a parameter's value does not prove it). Clicks are most rows, so a
    scan of the workspace's ids meets them soon."""
    where = ["workspace_id = $1"]
    if link:
        where.append(link_keys.of_link("link_id", f"${len(where) + 1}"))
    if type_:
        where.append(f"type = ${len(where) + 1}::smallint")
    limit = f"${len(where) + 1}"
    if type_ and not clicks:
        where.append("type <> 1")
    order = "received_at DESC, event_id DESC" if link else "event_id DESC"
    return f"SELECT {_EVENT_COLUMNS} FROM events WHERE {' AND '.join(where)} ORDER BY {order} LIMIT {limit}"


async def list_events(
    conn: asyncpg.Connection, workspace_id: str, *, link_id: str | None, type_: str | None, limit: int
) -> list[dict[str, Any]]:
    args: list[Any] = [workspace_id]
    if link_id:
        args.append(as_uuid(link_id))
    if type_:
        args.append(int(_TYPES[type_]))
    query = events_query(link=bool(link_id), type_=bool(type_), clicks=type_ in (None, "click"))
    rows = await conn.fetch(query, *args, limit)
    out = []
    for r in rows:
        d = row_json(r)
        d["type"] = EventType(r["type"]).name.lower()
        out.append(d)
    return out


_SALE_COLUMNS = (
    "event_id, invoice_id, customer_external_id, amount, currency, event_name, payment_processor, lead_event_name,"
    " link_id, affiliate_id, program_id, lead_event_id, click_id, unattributed, dialect, received_at, metadata,"
    " refunds, refunded"
)
SALE_FILTERS = {"link_id": "link_id", "affiliate_id": "affiliate_id", "customer_id": "customer_external_id"}


def query_value(name: str, value: str) -> str:
    """A list's filter as given: a currency's three lower-case letters; else no control
    character (Postgres takes no NUL) and at most 256 characters. Otherwise the route's 400."""
    if name == "currency":
        if not (len(value) == 3 and value.isascii() and value.isalpha() and value.islower()):
            raise BodyError(400, "invalid", "currency: ISO 4217, three lower-case letters")
    elif len(value) > 256 or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise BodyError(400, "invalid", f"{name}: at most 256 characters, none a control character")
    return value


def sales_query(filters: tuple[str, ...], *, before: bool) -> str:
    """GET /v1/conversions: a workspace's sales, newest first (by event id, a UUIDv7: its
    time), optionally of one link, affiliate or customer, before a cursor. One statement per
    combination of filters, as ``events_query``: sales_workspace, sales_link, sales_affiliate
    or sales_customer serves it."""
    where = ["workspace_id = $1"] + [f"{SALE_FILTERS[f]} = ${i + 2}" for i, f in enumerate(filters)]
    if before:
        where.append(f"event_id < ${len(where) + 1}::uuid")
    return (
        f"SELECT {_SALE_COLUMNS} FROM sales WHERE {' AND '.join(where)} ORDER BY event_id DESC LIMIT ${len(where) + 1}"
    )


def _customer(value: str) -> str:
    """A customer filter: the external id as every door stores it (``ingest.contract.ids``)."""
    return ids.normalized_or_none(value) or query_value("customer_id", value)


async def list_sales(
    conn: asyncpg.Connection, workspace_id: str, filters: dict[str, str], before: str | None, limit: int
) -> dict[str, Any]:
    """A page of sales and the cursor of the next (None: the last page)."""
    names = tuple(f for f in SALE_FILTERS if f in filters)
    args: list[Any] = [workspace_id]
    args += [as_uuid(filters[f]) if f != "customer_id" else _customer(filters[f]) for f in names]
    if before is not None:
        args.append(as_uuid(before))
    rows = await conn.fetch(sales_query(names, before=before is not None), *args, limit + 1)
    page = [row_json(r) for r in rows[:limit]]
    return {"data": page, "next": page[-1]["event_id"] if len(rows) > limit else None}


# the other reads, each served by an index (tests/test_explain.py): customers_external,
# links_affiliate, and links' primary key for GET /v1/links/{id} (the stats routes' reads
# are ingest.manage.stats')
CUSTOMER = (
    "SELECT id, external_id, visitor_id, email, name, avatar_url, status, link_id, affiliate_id, program_id,"
    " first_click_id, first_seen_at, last_seen_at FROM customers WHERE workspace_id = $1 AND external_id = $2"
    " ORDER BY last_seen_at DESC LIMIT 1"
)
LINK_BY_ID = _LINK + " WHERE id = $1 AND workspace_id = $2"
# an affiliate's links by page, newest first (links_affiliate_created), before a cursor's link
AFFILIATE_LINKS = _LINK + " WHERE workspace_id = $1 AND affiliate_id = $2 ORDER BY created_at DESC, id DESC LIMIT $3"
AFFILIATE_LINKS_BEFORE = (
    _LINK + " WHERE workspace_id = $1 AND affiliate_id = $2 AND (created_at, id) < ($4, $5)"
    " ORDER BY created_at DESC, id DESC LIMIT $3"
)


async def get_customer(conn: asyncpg.Connection, workspace_id: str, forms: list[str]) -> dict[str, Any]:
    """The customer named by the first of ``forms`` (``ingest.contract.ids.stored_forms``) that one holds."""
    for external_id in forms:
        row = await conn.fetchrow(CUSTOMER, workspace_id, external_id)
        if row is not None:
            break
    else:
        raise NotFound("customer not found")
    d = row_json(row)
    d["status"] = {1: "click", 2: "lead", 3: "converted"}[row["status"]]
    return d


async def affiliate_links(
    conn: asyncpg.Connection, workspace_id: str, affiliate_id: str, before: str | None, limit: int
) -> dict[str, Any]:
    """A page of the affiliate's links, newest first, and the next page's ``before`` (the
    last link's id; None: the last page). A cursor naming none of their links is not found."""
    if before is None:
        rows = await conn.fetch(AFFILIATE_LINKS, workspace_id, affiliate_id, limit + 1)
    else:
        at = await conn.fetchval(
            "SELECT created_at FROM links WHERE id = $1 AND workspace_id = $2 AND affiliate_id = $3",
            as_uuid(before),
            workspace_id,
            affiliate_id,
        )
        if at is None:
            raise NotFound("cursor not found")
        rows = await conn.fetch(AFFILIATE_LINKS_BEFORE, workspace_id, affiliate_id, limit + 1, at, as_uuid(before))
    page = [row_json(r) for r in rows[:limit]]
    return {"data": page, "next": page[-1]["id"] if len(rows) > limit else None}
