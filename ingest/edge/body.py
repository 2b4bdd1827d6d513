"""Reading request bodies: the one boundary every route with a body goes through.

``read`` takes the body under a cap and a deadline; ``json_object`` and ``parse`` turn it
into a validated model. Each failure is a ``BodyError`` the route answers in its own
dialect's shape: 400 (unreadable: broken framing, not gzip, not JSON, invalid; JSON past
the bounds of ``ingest.contract.bounds``: nested too deep, too many values), 408 (not in
full within ``REFSTREAM_BODY_TIMEOUT_S``), 413 (over the route's cap), 415 (a
``Content-Encoding`` other than gzip, deflate or identity). A body refused for its size,
its framing or its slowness also closes the connection: what the client still sends is
never read into a request, and never inflated.

The edge's runner (``ingest.host.server``) turns aiohttp's own decompression off, so a gzip body
is inflated here, a bounded slice at a time: a bomb costs what its first megabyte costs.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Any, TypeVar

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from pydantic import BaseModel, ValidationError

from ingest.contract import bounds
from ingest.contract.errors import Refused
from ingest.edge.state import EDGE

M = TypeVar("M", bound=BaseModel)

# set on the app by ingest.host.server.make_runner: aiohttp hands bodies over as sent
RAW_BODIES = web.AppKey("raw_bodies", bool)
# set on a request whose body was refused: the response closes the connection
# (a typed key where this aiohttp has them, which it recommends; a plain one before)
CLOSE: Any = web.RequestKey("refstream_close", bool) if hasattr(web, "RequestKey") else "refstream_close"


class BodyError(Refused):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind  # "too_large" | "invalid_json" | "invalid" | "timeout" | "encoding"
        self.message = message


# the body once read, on the request: a second read returns it
_READ: Any = web.RequestKey("refstream_body", bytes) if hasattr(web, "RequestKey") else "refstream_body"
_CODES = {"too_large": "payload_too_large", "timeout": "request_timeout", "encoding": "unsupported_encoding"}


def code(exc: BodyError, invalid: str = "invalid_request") -> str:
    """The error code of the APIs shaped ``{"error": code}`` (Affixo, batch, management)."""
    return _CODES.get(exc.kind) or ("invalid_json" if exc.kind == "invalid_json" else invalid)


def plain(text: str, limit: int = 256) -> bool:
    """A path segment fit to look up: short, printable (so no NUL), valid Unicode (a lone
    surrogate, what aiohttp makes of bytes that are not UTF-8, is of category Cs, which
    ``str.isprintable`` refuses like every other non-printable one)."""
    return 0 < len(text) <= limit and text.isprintable()


def _refuse(request: web.Request, status: int, kind: str, message: str) -> BodyError:
    request[CLOSE] = True
    return BodyError(status, kind, message)


def _inflater(request: web.Request) -> Any:
    """A decompressor for the body's Content-Encoding; None when there is nothing to undo."""
    coding = request.headers.get("Content-Encoding", "").strip().lower()
    if coding in ("", "identity"):
        return None
    if coding not in ("gzip", "x-gzip", "deflate"):
        raise _refuse(request, 415, "encoding", f"Content-Encoding {coding[:32]!r}: gzip, deflate or identity")
    if not request.app.get(RAW_BODIES, False):
        return None  # an app run without ingest.host.server's runner: aiohttp inflated it already
    return zlib.decompressobj(zlib.MAX_WBITS | (16 if "gzip" in coding else 0))


async def read(request: web.Request, limit: int | None = None) -> bytes:
    """The body, decompressed, at most ``limit`` bytes (default ``REFSTREAM_MAX_BODY_BYTES``)
    before and after decompression, in full within ``REFSTREAM_BODY_TIMEOUT_S``."""
    if not request.body_exists and "Content-Encoding" not in request.headers:
        return b""  # none sent (seed 000): nothing to read, cap or inflate
    settings = request.app[EDGE].settings
    limit = settings.max_body_bytes if limit is None else limit
    too_large = f"body larger than {limit} bytes"
    kept: bytes | None = request.get(_READ)
    if kept is not None:  # read before (an idempotency key's fingerprint): the stream is spent
        if len(kept) > limit:
            raise _refuse(request, 413, "too_large", too_large)
        return kept
    if request.content_length is not None and request.content_length > limit:
        raise _refuse(request, 413, "too_large", too_large)  # said up front: nothing is read
    inflater = _inflater(request)
    out = bytearray()
    stream = request.content
    try:
        if stream.is_eof():  # all of it arrived with the headers (or there is none): no deadline to arm
            await _take(request, stream, inflater, limit, out)
        else:
            async with asyncio.timeout(settings.body_timeout_s):
                await _take(request, stream, inflater, limit, out)
    except TimeoutError:
        raise _refuse(request, 408, "timeout", f"body not received within {settings.body_timeout_s:g} s") from None
    except (RequestPayloadError, HttpProcessingError):
        # broken chunked framing, a body cut short, what aiohttp could not inflate
        raise _refuse(request, 400, "invalid_json", "body could not be read (broken framing or encoding)") from None
    except zlib.error:
        raise _refuse(request, 400, "invalid_json", "body is not valid gzip/deflate") from None
    if inflater is not None and not inflater.eof:
        raise _refuse(request, 400, "invalid_json", "compressed body is truncated")
    request[_READ] = body = bytes(out)
    return body


async def _take(request: web.Request, stream: Any, inflater: Any, limit: int, out: bytearray) -> None:
    received = 0
    too_large = f"body larger than {limit} bytes"
    while chunk := await stream.readany():
        received += len(chunk)
        if received > limit:
            raise _refuse(request, 413, "too_large", too_large)
        # max_length: never more than the cap is inflated, whatever the ratio
        out += inflater.decompress(chunk, limit + 1 - len(out)) if inflater else chunk
        if len(out) > limit:
            raise _refuse(request, 413, "too_large", too_large)


async def json_object(request: web.Request, limit: int | None = None) -> dict[str, Any]:
    raw = await read(request, limit)
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BodyError(400, "invalid_json", "body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BodyError(400, "invalid_json", "body must be a JSON object")
    bounded(data)
    # NUL (which Postgres text and jsonb refuse) is refused by the models, in the fields they
    # keep (ingest.contract.fields): one in a field they ignore is dropped with it
    return data


def bounded(doc: Any, where: str = "body") -> None:
    """``doc`` within the bounds of client JSON (``ingest.contract.bounds``), else the
    route's 400 (kind ``invalid``: each dialect's validation error), saying which bound."""
    try:
        bounds.check(doc)
    except bounds.BoundsError as exc:
        raise BodyError(400, "invalid", f"{where}: {exc}") from None


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
