"""Dub's shapes, as its OpenAPI document has them and its SDKs (PyPI and npm ``dub``) parse
them: the answers of ``/track/lead``, ``/track/sale`` and ``/track/click`` (also the
fields Refport's answers carry beside their own, since Refport's API is Dub's), and the
error body ``{"error": {"code", "message", "doc_url"}}`` with Dub's codes.

The models document the answers (``GET /openapi.json``); the routes build the same bytes
without them, and the tests hold the two together.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel

# Dub's error code for each status its SDKs parse into a typed error; any other 4xx is
# ``bad_request`` in shape (the SDKs raise their generic API error for it), a 5xx
# ``internal_server_error``
CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    409: "conflict",
    410: "invite_expired",
    422: "unprocessable_entity",
    429: "rate_limit_exceeded",
}
DOC_URL = "https://dub.co/docs/api-reference/errors#"


def code_for(status: int) -> str:
    return CODES.get(status) or ("bad_request" if status < 500 else "internal_server_error")


def error_body(status: int, message: str) -> bytes:
    code = code_for(status)
    return orjson.dumps({"error": {"code": code, "message": message, "doc_url": DOC_URL + code.replace("_", "-")}})


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """Dub's error answer for ``status``: the code Dub gives it, its message, the page that
    explains the code."""
    return web.Response(
        body=error_body(status, message), status=status, content_type="application/json", headers=headers
    )


def is_dub_sdk(request: web.Request) -> bool:
    """A client generated from Dub's OpenAPI document: its SDKs name themselves in their
    User-Agent (``speakeasy-sdk/python 0.39.0 … dub``, ``speakeasy-sdk/typescript … dub``)."""
    agent = request.headers.get("User-Agent", "")
    return agent.startswith("speakeasy-sdk/") and agent.endswith(" dub")


def for_dub_sdk(request: web.Request, response: web.Response) -> web.Response:
    """An error answer of Refport's, for a client that is Dub's SDK: the same status and
    message, with Dub's code, which the SDK's closed list of codes parses into its typed
    error (Refport's own code, which it would refuse, becomes the message's prefix). Every
    other client, and every 2xx, gets Refport's answer as its document has it."""
    if response.status < 400 or not is_dub_sdk(request) or not isinstance(response.body, bytes):
        return response
    try:
        given = orjson.loads(response.body)["error"]
        message = f"{given['code']}: {given['message']}"
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return response
    headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-type", "content-length")}
    return error(response.status, message, headers)


# the answers, as Dub's models have them (every field required; null where refstream has no value)


class ClickEcho(BaseModel):
    id: str


class LinkEcho(BaseModel):
    id: str
    domain: str
    key: str
    url: str
    programId: str | None
    shortLink: str
    partnerId: str | None
    tenantId: str | None
    externalId: str | None


class LeadCustomer(BaseModel):
    externalId: str | None
    email: str | None
    name: str | None
    avatar: str | None


class TrackLeadAnswer(BaseModel):
    click: ClickEcho
    link: LinkEcho | None
    customer: LeadCustomer


class SaleCustomer(BaseModel):
    id: str
    externalId: str | None
    name: str | None
    email: str | None
    avatar: str | None


class SaleEcho(BaseModel):
    amount: int
    currency: str
    paymentProcessor: str
    invoiceId: str | None
    metadata: dict[str, Any] | None


class TrackSaleAnswer(BaseModel):
    eventName: str
    customer: SaleCustomer | None
    sale: SaleEcho | None


class TrackClickAnswer(BaseModel):
    clickId: str
    partner: dict[str, Any] | None
    discount: dict[str, Any] | None


class DubErrorBody(BaseModel):
    code: str
    message: str
    doc_url: str


class DubError(BaseModel):
    error: DubErrorBody


def customer_id(external_id: str) -> str:
    """A sale's ``customer.id``: the id refstream's API names a customer by, their external
    id (``GET /v1/customers/{external_id}``); the edge does not read the customer's row. An
    erasure rewrites it with the ``externalId`` beside it: the same value."""
    return external_id


def sale_answer(
    event_name: str,
    external_id: str,
    name: str | None,
    email: str | None,
    avatar: str | None,
    sale: dict[str, Any],
) -> bytes:
    """A sale's answer: the event name, the customer and the sale as recorded."""
    customer = {
        "id": customer_id(external_id),
        "externalId": external_id,
        "name": name,
        "email": email,
        "avatar": avatar,
    }
    return orjson.dumps({"eventName": event_name, "customer": customer, "sale": sale})
