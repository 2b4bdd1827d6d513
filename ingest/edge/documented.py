"""A route's entry in ``GET /openapi.json``, declared at its handler: ``@documented`` under the
route's decorator says what the route takes and answers, and the route's decorator says its
method and path. The host's assembler (``ingest.host.openapi``) reads the entry of every
route the app serves (``doc_of``) and renders the document from the pydantic models named
here, so a route and its documentation are read and changed together, and a route served
without one fails the document.

```python
@routes.post("/v1/track/click")
@documented("Track a click", "Affixo", {200: ClickRecorded, **errors(Error, 401, 429, 503, *BODY)}, Click, "bearer")
@VOICE.answers
async def track_click(request: web.Request) -> web.Response: ...
```
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from pydantic import BaseModel

# a request or response body: one model, one of several, or none (no JSON body)
Body = type[BaseModel] | tuple[type[BaseModel], ...] | None

_ATTRIBUTE = "openapi_doc"  # where a handler carries its entry
H = TypeVar("H", bound=Callable[..., Any])


@dataclass(frozen=True)
class Doc:
    """What a route's handler declares of it: everything but its method and path."""

    summary: str
    tag: str
    responses: dict[int, Body]
    request: type[BaseModel] | None = None
    security: str | None = None  # "bearer" | "apiKey" | None (public)
    query: dict[str, dict[str, Any]] = field(default_factory=dict)  # name: JSON schema
    # a write idempotent by itself (a conversion on (code, session), Dub's click per browser
    # and link): no Idempotency-Key
    idempotent: bool = False
    # a keyed write that changes Postgres: its key is reserved while the first copy runs
    # (409 meanwhile); the management API's writes all are
    reserves: bool = False


@dataclass(frozen=True, kw_only=True)
class Op(Doc):
    """One operation of the document: a served route's method and path, and its handler's ``Doc``."""

    method: str  # lower case, as the document has it
    path: str  # the route's template: ``/v1/links/{id}``

    @classmethod
    def of(cls, method: str, path: str, doc: Doc) -> Op:
        return cls(method=method.lower(), path=path, **{f.name: getattr(doc, f.name) for f in fields(Doc)})


def documented(
    summary: str,
    tag: str,
    responses: dict[int, Body],
    request: type[BaseModel] | None = None,
    security: str | None = None,
    *,
    query: dict[str, dict[str, Any]] | None = None,
    idempotent: bool = False,
    reserves: bool = False,
) -> Callable[[H], H]:
    """The handler's entry in the document, kept on the handler itself (placed right under the
    route's decorator, it marks the function the route serves)."""
    doc = Doc(summary, tag, responses, request, security, query or {}, idempotent, reserves)

    def mark(handler: H) -> H:
        setattr(handler, _ATTRIBUTE, doc)
        return handler

    return mark


def doc_of(handler: Callable[..., Any]) -> Doc | None:
    """The entry ``documented`` gave the handler, or None."""
    doc = getattr(handler, _ATTRIBUTE, None)
    return doc if isinstance(doc, Doc) else None


def errors(model: Body, *codes: int) -> dict[int, Body]:
    return {code: model for code in codes}


# every route with a body: unreadable or past the bounds of client JSON (400:
# ingest.contract.bounds), too slow (408), too large (413), an encoding
# other than gzip, deflate or identity (415); every route: rate limited (429, Retry-After)
# and unavailable (503, Retry-After)
BODY = (400, 408, 413, 415)
