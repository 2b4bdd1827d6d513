"""Seed 001 (Bricqs): the dialect's management calls, under ``/api/v1/referrals`` with the
tracking ones (``ingest/edge/routes/bricqs.py``: ``validate``, ``convert``, the error shape).

- ``POST /generate`` (``X-API-Key``, scope ``write``): the participant's code in the
  campaign (participant = affiliate by external id, campaign = program), created once;
- ``GET /stats/{participant_id}`` (``X-API-Key``, scope ``read``).
Both read and write Postgres through the management API (``ingest.manage.admin``), so they
live in its room; they answer in Bricqs' shape: ``{"error": code, "message": text}``.
"""

from __future__ import annotations

import uuid

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from ingest.contract import ids
from ingest.contract.connections import PG_ERRORS, REDIS_ERRORS, acquired
from ingest.contract.errors import NotFound, NotSent, OutcomeUnknown
from ingest.contract.fields import ExternalId
from ingest.edge import accept
from ingest.edge.auth import Principal, plausible
from ingest.edge.body import BodyError, parse
from ingest.edge.body import code as body_code
from ingest.edge.documented import BODY, documented, errors
from ingest.edge.enqueue import retry_headers
from ingest.edge.idempotency import Claim, InvalidKey, fingerprint, header_key
from ingest.edge.lookup import keyed_lookup
from ingest.edge.problem import Down, Problem, is_outage
from ingest.edge.resolve import Unavailable
from ingest.edge.routes.bricqs import BricqsError, error, json, unavailable
from ingest.edge.state import EDGE, Edge
from ingest.manage import admin
from ingest.privacy import external_ids

routes = web.RouteTableDef()


class BricqsGenerate(BaseModel):
    model_config = ConfigDict(extra="ignore")
    participant_id: ExternalId = Field(min_length=1, max_length=128)
    campaign_id: uuid.UUID


class BricqsGenerated(BaseModel):
    code: str
    referral_url: str
    participant_id: str
    created_at: str


class BricqsMilestone(BaseModel):
    name: str
    threshold: int
    reached_at: str


class BricqsStats(BaseModel):
    participant_id: str
    total_referrals: int
    conversions: int
    pending: int
    referral_code: str | None
    milestones: list[BricqsMilestone] = []


# the keyed routes' refusals, raised below the route (``Problem``, ``Down``) and said here
VOICE = accept.Voice("bricqs_keyed", error, lambda headers: error(503, "unavailable", "Try again shortly", headers))


async def _keyed(request: web.Request, scope: str) -> tuple[Edge, Principal]:
    """X-API-Key authentication and the per-key rate limit; raises the route's refusal
    (``Problem``) or its 503 (``Down``)."""
    edge = request.app[EDGE]
    secret = plausible(request.headers.get("X-API-Key", "").strip())
    if secret is None:
        raise Problem(401, "unauthorized", "Invalid or missing API key")
    try:
        # a HEAD changes nothing, its rate limit included
        found = await keyed_lookup(edge, edge.key_limiter, secret, counted=request.method != "HEAD")
    except (Unavailable, NotSent, OutcomeUnknown, *REDIS_ERRORS) as exc:
        raise Down() from exc  # a plain 503
    if found.principal is None:
        raise Problem(401, "unauthorized", "Invalid or missing API key")
    if not found.principal.allows(scope) or found.principal.kind != "workspace":
        raise Problem(403, "insufficient_scope", f"This key lacks the {scope} scope")
    if not found.verdict.allowed:
        edge.drops.note(found.principal.workspace_id, None, "rate_limited")
        raise Problem(429, "rate_limited", "Too many requests", found.verdict.headers)
    return edge, found.principal


@routes.post("/api/v1/referrals/generate")
@documented(
    "Generate a referral code (Bricqs, seed 001)",
    "Bricqs",
    {200: BricqsGenerated, **errors(BricqsError, 401, 403, 404, 429, 503, *BODY)},
    BricqsGenerate,
    "apiKey",
    reserves=True,  # a keyed write that changes Postgres
)
@VOICE.answers
async def generate(request: web.Request) -> web.Response:
    edge, principal = await _keyed(request, "write")
    try:
        body = await parse(request, BricqsGenerate)
        idem_key = header_key(request)
    except BodyError as exc:
        return error(exc.status, "validation_error" if exc.status == 400 else body_code(exc), exc.message)
    except InvalidKey as exc:
        return error(400, "validation_error", str(exc))

    async def run() -> web.Response:
        try:
            async with (
                edge.shards.writing(principal.workspace_id),  # a move's fence waits for it
                acquired(await edge.pool(principal.workspace_id)) as conn,
            ):
                out = await admin.referral_code(
                    conn,
                    edge.redis,
                    edge.keys,
                    workspace_id=principal.workspace_id,
                    program_id=str(body.campaign_id),
                    participant_id=body.participant_id,
                    claim=edge.shards.claim_code,
                )
        except NotFound as exc:
            return error(404, "campaign_not_found", str(exc))
        except Exception as exc:
            if not (is_outage(exc) or isinstance(exc, REDIS_ERRORS)):  # (redis-py's: the link cache's refresh)
                raise
            # a commit whose answer was lost with the connection may be done: "may be stored"
            return error(503, "unavailable", "Try again shortly", retry_headers(exc, wrote=True))
        return json(200, BricqsGenerated(**out).model_dump())

    if idem_key is None:
        return await run()
    # already idempotent per (participant, campaign); the key is honoured like everywhere
    # else: a repeat gets the stored answer, the key with another body a 422
    claim = Claim.of(idem_key, "bricqs-generate", principal.workspace_id, fingerprint(body.model_dump(mode="json")))
    secret = request.headers.get("X-API-Key", "").strip()
    try:
        return await edge.idem.once(edge.batcher, claim, secret, idem_key, run, error)
    except (NotSent, OutcomeUnknown, *REDIS_ERRORS):
        return unavailable()


@routes.get("/api/v1/referrals/stats/{participant_id}")
@documented(
    "Referral statistics of a participant",
    "Bricqs",
    {200: BricqsStats, **errors(BricqsError, 401, 403, 404, 429, 503)},
    security="apiKey",
)
@VOICE.answers
async def stats(request: web.Request) -> web.Response:
    edge, principal = await _keyed(request, "read")
    out, forms = None, None
    try:
        async with acquired(await edge.pool(principal.workspace_id)) as conn:
            given = request.match_info["participant_id"]
            try:  # the id as generate stores it, then as given and as stored before the rule
                forms = await external_ids.participants(conn, principal.workspace_id, given)
            except ids.InvalidId:  # nothing can hold it
                return error(404, "participant_not_found", "participant not found")
            for participant in forms:
                try:
                    out = await admin.participant_stats(
                        conn, workspace_id=principal.workspace_id, participant_id=participant
                    )
                    break
                except NotFound:
                    continue
    except PG_ERRORS:
        return unavailable()
    if out is None:
        return error(404, "participant_not_found", f"participant {forms[0]!r} not found" if forms else "not found")
    return json(200, BricqsStats(**out).model_dump())
