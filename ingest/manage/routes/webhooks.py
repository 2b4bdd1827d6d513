"""Webhook endpoints in the management API, ``/v1/webhooks``: same auth, scopes and error
shapes as the rest of ``/v1`` (see ``routes._guard``), scoped to the key's workspace.

The signing secret is answered once, at creation, and stored Fernet-encrypted under
``REFSTREAM_SECRET_KEY``; without that key these routes answer 503 ``webhooks_unconfigured``.
How deliveries are signed and retried: ``workers.consumer.webhooks``.
"""

from __future__ import annotations

from typing import Any, Literal, get_args
from uuid import UUID

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator
from yarl import URL

from ingest.contract.connections import acquired
from ingest.contract.errors import NotFound
from ingest.contract.fields import Url
from ingest.edge.auth import Principal
from ingest.edge.body import parse
from ingest.edge.documented import documented
from ingest.edge.state import Edge
from ingest.ledger import secretbox, targets
from ingest.manage.manage import as_uuid
from ingest.manage.routes._guard import LIMIT, MANAGE, MANAGE_BODY, ManageError, error, guarded, json, limit_param

routes = web.RouteTableDef()

EventType = Literal[
    "lead.created",
    "conversion.created",
    "milestone.reached",
    "fraud.flagged",
    "sale.created",
    "commission.created",
    "payout.paid",
    "refund.created",
]  # ingest.ledger.outbox.EVENT_TYPES, in its order
EVENT_TYPES: tuple[EventType, ...] = get_args(EventType)


class NewWebhook(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: Url = Field(
        min_length=1,
        max_length=2048,
        description="Receives a signed POST; a public address (see REFSTREAM_WEBHOOK_ALLOW_PRIVATE)",
    )
    events: list[EventType] = Field(
        default_factory=lambda: list(EVENT_TYPES), min_length=1, max_length=len(EVENT_TYPES), description="Default: all"
    )

    @field_validator("url")
    @classmethod
    def _has_host(cls, v: str) -> str:
        try:
            host = URL(v).host
        except ValueError:
            host = None
        if not host:
            raise ValueError("not an absolute http(s) URL")
        return v


class Webhook(BaseModel):
    id: str
    url: str
    events: list[EventType]
    secret: str = Field(description="Shown once; signs X-Refstream-Signature. Stored encrypted.")
    created_at: str


class Attempt(BaseModel):
    attempt: int
    at: str
    status_code: int | None = Field(description="The receiver's answer; null when none came")
    error: str | None = Field(description="Why no answer came: timeout, refused connection ...")
    duration_ms: int | None


class Delivery(BaseModel):
    id: str
    webhook_id: str
    event_type: EventType
    subject_id: str
    subject_key: str
    status: Literal["pending", "delivered", "failed"]
    created_at: str
    delivered_at: str | None
    payload: dict[str, Any]
    attempts: list[Attempt] = Field(description="Every attempt, oldest first")


class DeliveryList(BaseModel):
    data: list[Delivery]


def _secret_key(edge: Edge) -> str | None:
    return getattr(edge.settings, "secret_key", None)


def _unconfigured(detail: str = "set REFSTREAM_SECRET_KEY") -> web.Response:
    return error(503, "webhooks_unconfigured", detail)


def _plain(value: Any) -> Any:
    if isinstance(value, UUID):
        return str(value)
    return value.isoformat() if hasattr(value, "isoformat") else value


@routes.post("/v1/webhooks")
@documented(
    "Create a webhook (lead.created, conversion.created, milestone.reached, "
    "fraud.flagged) to a public address; its signing secret is shown once",
    "Webhooks",
    {201: Webhook, 409: ManageError, **MANAGE_BODY},
    NewWebhook,
    "bearer",
)
@guarded("write")
async def create_webhook(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    key = _secret_key(edge)
    if not key:
        return _unconfigured()
    body = await parse(request, NewWebhook)
    if not edge.settings.webhook_allow_private and (why := targets.url_refusal(body.url)):
        return error(400, "invalid_request", f"url: {why}; webhooks are delivered to public addresses only")
    events = sorted(set(body.events), key=EVENT_TYPES.index)
    secret = secretbox.new_secret()
    try:
        token = secretbox.encrypt(key, secret)
    except secretbox.SecretKeyError as exc:
        return _unconfigured(str(exc))
    async with acquired(await edge.pool(p.workspace_id)) as conn:
        row = await conn.fetchrow(
            "INSERT INTO webhooks (workspace_id, url, events, secret_encrypted, secret_prefix)"
            " VALUES ($1, $2, $3, $4, $5) RETURNING id, url, events, created_at",
            p.workspace_id,
            body.url,
            events,
            token,
            secretbox.display_prefix(secret),
        )
    assert row is not None
    return json(201, {**{k: _plain(v) for k, v in row.items()}, "secret": secret})


_DELIVERIES = """
SELECT d.id, d.webhook_id, d.event_type, d.subject_id, d.subject_key, d.status, d.created_at, d.delivered_at,
       d.payload,
       COALESCE((SELECT jsonb_agg(jsonb_build_object('attempt', a.attempt, 'at', a.at, 'status_code', a.status_code,
                                                     'error', a.error, 'duration_ms', a.duration_ms) ORDER BY a.attempt)
                   FROM webhook_attempts a WHERE a.delivery_id = d.id), '[]'::jsonb) AS attempts
  FROM webhook_deliveries d
 WHERE d.webhook_id = $1
 ORDER BY d.created_at DESC, d.id DESC
 LIMIT $2
"""


@routes.get("/v1/webhooks/{id}/deliveries")
@documented(
    "A webhook's deliveries with every attempt",
    "Webhooks",
    {200: DeliveryList, **MANAGE},
    security="bearer",
    query={"limit": LIMIT},
)
@guarded("read")
async def list_deliveries(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    """The newest deliveries of one webhook, each with its attempts."""
    limit = limit_param(request)
    webhook = as_uuid(request.match_info["id"])
    async with acquired(await edge.pool(p.workspace_id)) as conn:
        if not await conn.fetchval(
            "SELECT 1 FROM webhooks WHERE id = $1 AND workspace_id = $2", webhook, p.workspace_id
        ):
            raise NotFound("webhook not found")
        rows = await conn.fetch(_DELIVERIES, webhook, limit)
    return json(200, {"data": [{k: _plain(v) for k, v in r.items()} for r in rows]})
