"""Reading request bodies: capped, parsed, validated; each failure a value the route turns
into its own dialect's error shape."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class BodyError(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind  # "too_large" | "invalid_json" | "invalid"
        self.message = message


async def json_object(request: web.Request) -> dict[str, Any]:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyError(413, "too_large", f"body larger than {request.client_max_size} bytes") from None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BodyError(400, "invalid_json", "body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BodyError(400, "invalid_json", "body must be a JSON object")
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
