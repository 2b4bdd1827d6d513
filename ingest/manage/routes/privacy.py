"""Privacy in the management API: erasing a customer, an affiliate or a Bricqs participant
(scope ``erase``, which ``*`` does not grant) and following an erasure (``GET
/v1/erasures/{id}``), and the do-not-track lists (``/v1/suppressions``). What an erasure
does, and where: ``ingest.privacy`` and docs/privacy.md.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

import asyncpg
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from ingest.contract import ids, links
from ingest.contract.connections import PG_ERRORS, REDIS_ERRORS, acquired
from ingest.contract.errors import NotSent, OutcomeUnknown, Unknown
from ingest.contract.fields import EXTERNAL_ID, PLACEHOLDER, Text
from ingest.edge.auth import Principal
from ingest.edge.body import parse
from ingest.edge.documented import documented
from ingest.edge.state import Edge
from ingest.manage import suppressions
from ingest.manage.routes._guard import (
    LIMIT,
    MANAGE,
    MANAGE_BODY,
    ManageError,
    error,
    guarded,
    id_forms,
    json,
    limit_param,
    segment,
)
from ingest.privacy import erasure, erasure_affiliate, erasure_copy, external_ids

routes = web.RouteTableDef()


class NewSuppression(BaseModel):
    # a customer's value is an external id (``ids.normalize``, as the lead routes store it),
    # and neither a customer's nor a visitor's is a placeholder (no event names one): the
    # document says so for each kind; the route refuses them with its own message
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [
                {"properties": {"kind": {"const": "ip"}}},
                {"properties": {"kind": {"const": "visitor"}, "value": {"not": {"pattern": PLACEHOLDER}}}},
                {
                    "properties": {
                        "kind": {"const": "customer"},
                        "value": {"pattern": EXTERNAL_ID, "not": {"pattern": PLACEHOLDER}},
                    }
                },
            ]
        },
    )
    kind: Literal["visitor", "customer", "ip"] = Field(
        description="A visitor id, a customer's external id, or a client address"
    )
    value: Text = Field(min_length=1, max_length=256)


class Suppression(BaseModel):
    id: str = Field(description="The entry's digest: the list never holds the value")
    kind: Literal["visitor", "customer", "ip"]
    created_at: str
    created_by: str | None = None


class SuppressionList(BaseModel):
    data: list[Suppression] = Field(description="Newest first")
    next: str | None = Field(description="The next page's `before`; null on the last page")


class Erasure(BaseModel):
    model_config = ConfigDict(extra="allow")
    erasure_id: str
    workspace_id: str
    status: Literal["pending", "done"]
    pending: list[Literal["postgres", "redis", "archive"]] = Field(
        description="Places still holding the person: Redis and the archive are finished by the workers' sweep"
    )
    requested_at: str
    requested_by: str = Field(description="The prefix of the key that asked, or cli")
    archive_due: str = Field(description="The archive's segments are rewritten by then (REFSTREAM_ERASE_ARCHIVE_DAYS)")
    overdue: bool
    done: dict[str, Any] = Field(description="What each place's pass changed: counts of rows, entries, segments")


class AffiliateErasures(BaseModel):
    erasures: list[Erasure] = Field(description="One per affiliate erased (a participant: one per campaign)")


@routes.delete("/v1/customers/{external_id}")
@documented(
    "Erase a customer's personal data everywhere (scope erase, "
    "which * does not grant): Postgres at once, Redis and the archive by the workers; counters keep their "
    "numbers",
    "Management",
    {202: Erasure, **MANAGE},
    security="bearer",
)
@guarded("erase")
async def erase_customer(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    """Forget a customer everywhere (docs/privacy.md): Postgres now, Redis and the archive
    by the workers; 202 with what is pending, and GET /v1/erasures/{id} follows it."""
    id_forms(request, "external_id")  # 400 for one that can name nobody
    pool = await edge.pool(p.workspace_id)
    async with acquired(pool) as conn:  # the normalized id, as given, and as stored before the rule
        forms = await external_ids.subjects(conn, p.workspace_id, request.match_info["external_id"])
    days = edge.settings.erase_archive_days
    try:  # from here on, a failure may leave it begun: 503 "outcome unknown", and a retry finishes it
        erased = [await erasure.erase(pool, p.workspace_id, form, by=p.prefix, archive_days=days) for form in forms]
        async with acquired(await edge.pool(p.workspace_id)) as conn:
            shown = await erasure.show(conn, p.workspace_id, str(erased[0].id))
            copy = await erasure_copy.commands(conn, edge.keys, [done.id for done in erased])
    except (*PG_ERRORS, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:  # a read-only one too
        raise OutcomeUnknown("the erasure", Unknown.COMMIT) from exc
    # the ledger's copy outside Postgres (a restore that loses the erasure gets it back); the
    # sweep writes it too, and marks Redis done only once it is there
    if deletes := [*copy, *(d for done in erased for d in erasure.redis_deletes(edge.keys, done))]:
        try:
            await edge.batcher.execute(*deletes)
        except (NotSent, OutcomeUnknown, *REDIS_ERRORS):
            pass  # the click cache's entries and rate-limit windows expire by themselves; the sweep copies
    return json(202, shown)


@routes.delete("/v1/affiliates/{id}")
@documented(
    "Erase an affiliate's personal data everywhere (scope erase): name, email, "
    "external id and addresses; their links, commissions and payouts stay",
    "Management",
    {202: AffiliateErasures, **MANAGE},
    security="bearer",
)
@guarded("erase")
async def erase_affiliate(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    """Forget an affiliate (a partner, a person): their name, email, external id and
    addresses, wherever they are held; their links, commissions and payouts stay
    (docs/privacy.md). 202 with the erasure, as a customer's."""
    return await _erase_affiliates(edge, p, affiliate_id=segment(request, "id"))


@routes.delete("/v1/participants/{participant_id}")
@documented(
    "Erase a Bricqs participant (the affiliate of that external id in every campaign) as an affiliate (scope erase)",
    "Management",
    {202: AffiliateErasures, **MANAGE},
    security="bearer",
)
@guarded("erase")
async def erase_participant(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    """A Bricqs participant (an affiliate by external id, in every campaign): as above;
    202 with one erasure per campaign they were in. The id is normalized as ``generate``
    stores it, and a spelling stored before the rule is erased too (``external_ids``)."""
    return await _erase_affiliates(edge, p, participant_id=request.match_info["participant_id"])


async def _erase_affiliates(
    edge: Edge, p: Principal, *, affiliate_id: str | None = None, participant_id: str | None = None
) -> web.Response:
    days = edge.settings.erase_archive_days
    pool = await edge.pool(p.workspace_id)
    try:  # as a customer's: a failure may leave it begun, and a retry finishes it
        if participant_id is not None:  # every spelling that names them (ingest.contract.ids)
            done = await external_ids.erase_participant(
                pool, p.workspace_id, participant_id, by=p.prefix, archive_days=days
            )
        else:
            done = await erasure_affiliate.erase(
                pool,
                p.workspace_id,
                affiliate_id=affiliate_id,
                by=p.prefix,
                archive_days=days,
            )
        async with acquired(await edge.pool(p.workspace_id)) as conn:
            copy = await erasure_copy.commands(conn, edge.keys, [uuid.UUID(e["erasure_id"]) for e in done.erasures])
    except (*PG_ERRORS, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise OutcomeUnknown("the erasure", Unknown.COMMIT) from exc
    try:
        await links.put_committed(edge.redis, edge.keys, *done.cache)  # their external id, as a pseudonym
        await edge.batcher.execute(*copy, *erasure_affiliate.redis_commands(edge.keys, done))
    except (NotSent, OutcomeUnknown, *REDIS_ERRORS):
        pass  # the sweep copies the ledger; the link cache is put again by the workers' refresh; windows expire
    return json(202, done.to_dict())


@routes.post("/v1/suppressions")
@documented(
    "Do not track a visitor, customer or address: their events are answered as "
    "usual, stored nowhere and counted as suppressed drops (the list keeps digests, never values); a workspace "
    "lists at most REFSTREAM_SUPPRESSION_MAX entries (409 limit_reached past it)",
    "Management",
    {201: Suppression, 409: ManageError, **MANAGE_BODY},
    NewSuppression,
    "bearer",
)
@guarded("write")
async def add_suppression(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    """Do not track a visitor, customer or address: the edges answer their events as usual
    and store nothing, within REFSTREAM_SUPPRESSION_REFRESH_S. A workspace lists at most
    REFSTREAM_SUPPRESSION_MAX entries: past that, 409 ``limit_reached``."""
    body = await parse(request, NewSuppression)
    value = body.value
    if body.kind != "ip" and ids.placeholder(value):  # no event names one: it would list no one
        return error(400, "invalid_request", "value: a placeholder (such as 'undefined' or 'null') is no one's id")
    if body.kind == "customer":  # as the lead routes store it (ingest.contract.ids)
        try:
            value = ids.normalize(value)
        except ids.InvalidId as exc:
            return error(400, "invalid_request", f"value: {exc}")
    elif body.kind == "visitor":  # as the click routes store it where the rule takes it
        value = ids.normalized_or_none(value) or value
    most = edge.settings.suppression_max
    try:
        async with acquired(await edge.pool(p.workspace_id)) as conn:
            return json(201, await suppressions.add(conn, p.workspace_id, body.kind, value, by=p.prefix, most=most))
    except suppressions.Full as exc:
        return error(409, "limit_reached", str(exc))


@routes.get("/v1/suppressions")
@documented(
    "The workspace's do-not-track list (kinds and dates; no values), newest first, by page",
    "Management",
    {200: SuppressionList, **MANAGE},
    security="bearer",
    query={"before": {"type": "string", "pattern": "^[0-9]{1,20}-[0-9a-f]{32}$"}, "limit": LIMIT},
)
@guarded("read")
async def list_suppressions(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    """The list by page, newest first: ``?limit=`` (1 to 500, 50) and ``?before=`` (a page's ``next``)."""
    limit = limit_param(request)
    async with acquired(await edge.pool(p.workspace_id)) as conn:
        return json(200, await suppressions.listing(conn, p.workspace_id, request.query.get("before"), limit))


@routes.delete("/v1/suppressions/{id}")
@documented("Track a listed visitor, customer or address again", "Management", {204: None, **MANAGE}, security="bearer")
@guarded("write")
async def remove_suppression(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    async with acquired(await edge.pool(p.workspace_id)) as conn:
        await suppressions.remove(conn, p.workspace_id, segment(request, "id"))
    return web.Response(status=204)


@routes.get("/v1/erasures/{id}")
@documented(
    "An erasure: what is still pending, and its archive deadline (scope erase)",
    "Management",
    {200: Erasure, **MANAGE},
    security="bearer",
)
@guarded("erase")
async def get_erasure(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    async with acquired(await edge.pool(p.workspace_id)) as conn:
        return json(200, await erasure.show(conn, p.workspace_id, segment(request, "id")))
