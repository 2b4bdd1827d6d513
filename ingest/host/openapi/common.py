"""What every route table of ``/openapi.json`` is made of: an operation (``Op``), its bodies,
and the errors every route with a body answers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

Body = type[BaseModel] | tuple[type[BaseModel], ...] | None


@dataclass(frozen=True)
class Op:
    method: str
    path: str
    summary: str
    tag: str
    responses: dict[int, Body]
    request: type[BaseModel] | None = None
    security: str | None = None  # "bearer" | "apiKey" | None (public)
    query: dict[str, dict[str, Any]] = field(default_factory=dict)  # name: JSON schema
    extra: dict[str, Any] = field(default_factory=dict)


def errors(model: Body, *codes: int) -> dict[int, Body]:
    return {code: model for code in codes}


# every route with a body: unreadable or past the bounds of client JSON (400:
# ingest.contract.bounds), too slow (408), too large (413), an encoding
# other than gzip, deflate or identity (415); every route: rate limited (429, Retry-After)
# and unavailable (503, Retry-After)
BODY = (400, 408, 413, 415)
