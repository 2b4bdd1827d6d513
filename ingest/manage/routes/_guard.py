"""What every route of the management API, ``/v1``, shares: JSON; the ``Authorization:
Bearer`` key, its kind, scope (``write`` for changes, ``read`` for reads) and rate limit,
everything scoped to the key's workspace (affiliate keys, read-only, reach only
``/v1/affiliate/*`` and see only their own); ``Idempotency-Key`` on writes; and the data
layer's errors in this API's shape (``ManageError``: ``{"error": code, "detail": text}``,
as the Affixo API, seed 003, answers), through the ``guarded`` decorator."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from ingest.contract import ids
from ingest.contract.connections import REDIS_ERRORS, acquired
from ingest.contract.errors import Conflict, NotFound, NotSent, OutcomeUnknown
from ingest.contract.fields import IDENT
from ingest.edge.auth import Principal, bearer
from ingest.edge.body import BodyError, plain, read
from ingest.edge.body import code as body_code
from ingest.edge.documented import BODY, errors
from ingest.edge.enqueue import retry_headers
from ingest.edge.idempotency import Claim, InvalidKey, header_key, request_claim
from ingest.edge.lookup import keyed_lookup
from ingest.edge.problem import ManageError as ManageError
from ingest.edge.problem import Problem, is_outage
from ingest.edge.resolve import Unavailable
from ingest.edge.state import EDGE, Edge
from ingest.manage import stats


def json(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def error(status: int, code: str, detail: str | None = None, **extra: str) -> web.Response:
    return json(status, {"error": code, **({"detail": detail} if detail else {}), **extra})


# what the routes' entries in /openapi.json share (ingest.edge.documented): every route's
# errors, a route with a body's, and the query parameters of the lists
MANAGE = errors(ManageError, 400, 401, 403, 404, 429, 503)
MANAGE_BODY = {**MANAGE, **errors(ManageError, *BODY)}
LIMIT = {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}
DAY = {"type": "string", "format": "date", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}  # a UTC day, YYYY-MM-DD
CURRENCY = {"type": "string", "pattern": "^[a-z]{3}$"}  # ISO 4217, lower case
CUSTOMER = {"type": "string", "maxLength": 256, "pattern": IDENT}  # an external id
SEQ = {"type": "string", "pattern": "^[0-9]{1,18}$"}  # a ledger list's cursor


def segment(request: web.Request, name: str) -> str:
    """A path segment to look up; one no row can hold (control characters, NUL) is not found."""
    value = request.match_info[name]
    if not plain(value, 256):
        raise NotFound(f"{name} not found")
    return value


def id_forms(request: web.Request, name: str) -> list[str]:
    """A path segment that names a person by an external id (``ingest.contract.ids``): the
    normalized id, then the segment as given where it differs (a row stored before the rule
    holds it so). One that names nothing either way is the route's 400."""
    try:
        return ids.stored_forms(request.match_info[name])
    except ids.InvalidId as exc:
        raise BodyError(400, "invalid", f"{name}: {exc}") from None


def limit_param(request: web.Request, default: int = 50, most: int = 500) -> int:
    """``?limit=``: digits only (the document says integer), 1 to ``most``; else raises the
    route's 400 (``Problem``, which ``guarded`` renders)."""
    given = request.query.get("limit")
    if given is None:
        return default
    if not (given.isascii() and given.isdigit()):
        raise Problem(400, "invalid_request", "limit: an integer")
    if not 1 <= int(given) <= most:
        raise Problem(400, "invalid_request", f"limit: between 1 and {most}")
    return int(given)


def render(problem: Problem) -> web.Response:
    """A refusal raised below a management route, in the API's shape (``ManageError``)."""
    response = error(problem.status, problem.code, problem.message or None, **problem.fields)
    response.headers.update(problem.headers)
    return response


Handler = Callable[[web.Request, Edge, Principal], Awaitable[web.Response]]
WRITES = frozenset({"POST", "PATCH", "DELETE"})  # these honour Idempotency-Key


async def _claim(request: web.Request, key: str, workspace: str) -> Claim:
    raw = await read(request)  # kept on the request: the handler's parse reads it again for free
    return request_claim(request, key, workspace, raw)


def guarded(
    scope: str, *, affiliate: bool = False
) -> Callable[[Handler], Callable[[web.Request], Awaitable[web.Response]]]:
    """Bearer key, kind, scope and the per-key rate limit; then the handler, with the
    errors of the data layer turned into this API's shapes."""

    def wrap(handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def route(request: web.Request) -> web.Response:
            edge = request.app[EDGE]
            secret = bearer(request.headers.get("Authorization"))
            if secret is None:
                return error(401, "unauthorized")
            head = request.method == "HEAD"  # changes nothing: no rate limit counted, no address kept
            try:
                found = await keyed_lookup(edge, edge.key_limiter, secret, counted=not head)
            except (Unavailable, NotSent, OutcomeUnknown, *REDIS_ERRORS):
                return json(503, {"error": "unavailable"}, {"Retry-After": "1"})
            principal = found.principal
            if principal is None:
                return error(401, "unauthorized")
            if (principal.kind == "affiliate") != affiliate:
                return error(403, "insufficient_scope", need="affiliate key" if affiliate else "workspace key")
            if not principal.allows(scope):
                return error(403, "insufficient_scope", need=scope)
            if not found.verdict.allowed:
                return json(429, {"error": "rate_limited"}, found.verdict.headers)
            caller: Principal = principal
            try:
                idem_key = header_key(request) if request.method in WRITES else None
            except InvalidKey as exc:
                return error(400, "invalid_idempotency_key", str(exc))

            async def run() -> web.Response:
                try:
                    if caller.affiliate_id is not None and not head:  # where the affiliate's own actions come from
                        async with acquired(await edge.pool(caller.workspace_id)) as conn:
                            await stats.affiliate_seen(conn, caller.affiliate_id, edge.client_ip(request))
                    if request.method not in WRITES:
                        return await handler(request, edge, caller)
                    async with edge.shards.writing(caller.workspace_id):  # a move's fence waits for it
                        return await handler(request, edge, caller)
                except BodyError as exc:
                    return error(exc.status, body_code(exc), exc.message)
                except Problem as exc:
                    return render(exc)
                except NotFound as exc:
                    return error(404, "not_found", str(exc))
                except Conflict as exc:
                    return error(409, "conflict", str(exc))
                except Exception as exc:
                    if not (is_outage(exc) or isinstance(exc, REDIS_ERRORS)):  # (redis-py's: a cache refresh)
                        raise
                    return json(503, {"error": "unavailable"}, retry_headers(exc, wrote=request.method in WRITES))

            if idem_key is None:
                return await run()
            assert secret is not None
            try:
                claim = await _claim(request, idem_key, caller.workspace_id)
                return await edge.idem.once(edge.batcher, claim, secret, idem_key, run, lambda s, c, m: error(s, c, m))
            except BodyError as exc:
                return error(exc.status, body_code(exc), exc.message)
            except (NotSent, OutcomeUnknown, *REDIS_ERRORS):
                return json(503, {"error": "unavailable"}, {"Retry-After": "1"})

        return route

    return wrap
