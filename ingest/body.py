"""Reading request bodies: capped, parsed, validated; each failure a value the route turns
into its own dialect's error shape."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from .state import EDGE

M = TypeVar("M", bound=BaseModel)


class BodyError(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind  # "too_large" | "invalid_json" | "invalid"
        self.message = message


def header(request: web.Request, name: str, limit: int) -> str | None:
    """A header's text, safe to store: UTF-8 as sent, bytes that are not UTF-8 (aiohttp hands
    them over as lone surrogates) as U+FFFD, NULs (which Postgres text refuses) dropped."""
    value = request.headers.get(name)
    if not value:
        return None
    raw = value.encode("utf-8", "surrogateescape")  # the bytes the client sent
    clean = raw.decode("utf-8", "replace").replace("\x00", "")[:limit]
    return clean or None


def plain(text: str, limit: int = 256) -> bool:
    """A path segment fit to look up: short, printable (so no NUL), valid Unicode."""
    return 0 < len(text) <= limit and text.isprintable() and not any("\ud800" <= c <= "\udfff" for c in text)


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


async def json_object(request: web.Request) -> dict[str, Any]:
    limit = request.app[EDGE].settings.max_body_bytes
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raw = b"x" * (limit + 1)
    if len(raw) > limit:
        raise BodyError(413, "too_large", f"body larger than {limit} bytes")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BodyError(400, "invalid_json", "body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BodyError(400, "invalid_json", "body must be a JSON object")
    # Postgres stores no NUL in text or jsonb: refuse it here rather than accept an event
    # that could never be written
    if b"\\u0000" in raw and _has_nul(data):
        raise BodyError(400, "invalid", "NUL characters (\\u0000) are not allowed")
    return data


def validate(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BodyError(400, "invalid", describe(exc)) from None


async def parse(request: web.Request, model: type[M]) -> M:
    return validate(model, await json_object(request))


def describe(exc: ValidationError) -> str:
    """The first problems, one line: ``field: message; field: message``."""
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
