"""API keys in the management API: ``POST /v1/keys`` mints one (a workspace's, or an
affiliate's read-only key), answered once and stored as its sha256; ``DELETE
/v1/keys/{prefix}`` revokes one. Both take scope ``*``.
"""

from __future__ import annotations

from typing import Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from ingest.contract.connections import acquired
from ingest.contract.errors import NotFound
from ingest.contract.fields import Ident, Text
from ingest.edge.auth import Principal
from ingest.edge.body import parse
from ingest.edge.documented import documented
from ingest.edge.state import Edge
from ingest.manage import admin, manage
from ingest.manage.routes._guard import MANAGE, MANAGE_BODY, guarded, json, segment

routes = web.RouteTableDef()


Scope = Literal["read", "write", "track", "*"]


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scopes: list[Scope] = Field(default_factory=lambda: list[Scope](["track"]), max_length=4)
    affiliate_id: Ident | None = Field(None, max_length=64, description="A read-only key for this affiliate")
    name: Text | None = Field(None, max_length=200)
    expires_in_s: int | None = Field(
        None, gt=0, le=10 * 366 * 86400, description="Refused from this many seconds on; none: until revoked"
    )


class CreatedKey(BaseModel):
    api_key: str = Field(description="Shown once; only its sha256 is stored")
    prefix: str
    kind: str
    scopes: list[str]
    expires_at: str | None = Field(description="ISO 8601; null: until revoked")


class RevokedKey(BaseModel):
    revoked: str


@routes.post("/v1/keys")
@documented(
    "Create an API key (scope *); the key is shown once",
    "Management",
    {201: CreatedKey, **MANAGE_BODY},
    NewKey,
    "bearer",
)
@guarded("*")
async def create_key(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    # minting keys takes "*": a "write" key must not be able to make itself a "*" key
    body = await parse(request, NewKey)
    if body.affiliate_id is not None:
        manage.as_uuid(body.affiliate_id)
    async with acquired(await edge.pool(p.workspace_id)) as conn:
        created = await admin.create_key(
            conn,
            edge.redis,
            edge.keys,
            workspace_id=p.workspace_id,
            scopes=list(body.scopes),
            affiliate_id=body.affiliate_id,
            name=body.name,
            expires_in_s=body.expires_in_s,
        )
    return json(201, created)


@routes.delete("/v1/keys/{prefix}")
@documented("Revoke an API key (scope *)", "Management", {200: RevokedKey, **MANAGE}, security="bearer")
@guarded("*")
async def revoke_key(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    async with acquired(await edge.pool(p.workspace_id)) as conn:
        owned = await conn.fetchval(
            "SELECT 1 FROM api_keys WHERE prefix = $1 AND workspace_id = $2",
            segment(request, "prefix"),
            p.workspace_id,
        )
        if not owned:
            raise NotFound("key not found")
        s, prefix = edge.settings, request.match_info["prefix"]
        revoked = await admin.revoke_key(
            conn, edge.redis, edge.keys, prefix, replicas=s.ack_replicas, wait_ms=s.ack_wait_ms
        )
        return json(200, revoked)
