"""A route's answer decided below its handler is raised, not returned: a helper returns its
value or raises, and the route's dialect renders what was raised in its own error shape
(``accept.Voice.render``; the management API's guard, ``ingest.manage.routes._guard``), as
Starlette's exception handlers do. Nothing passes "a value or a response" up the edge.

- ``Problem`` (a ``Refused``): the request is refused: its ``status``, ``code``,
  ``message``, ``headers`` (a rate limit's), and any field a dialect's shape adds
  (``fields``: Affixo's ``need``). Each dialect words it its own way.
- ``Down`` (an ``Outage``): Redis, Postgres or the spool cannot answer for it now: the
  route's 503 with ``Retry-After``, and where its ``cause`` says Redis may hold the event,
  ``Refstream-Outcome: unknown`` (``ingest.edge.enqueue.retry_headers``).
- ``ManageError``: the shape the management API and the batch route render a refusal in,
  as their documents name it.
"""

from __future__ import annotations

from pydantic import BaseModel

from ingest.contract.connections import PG_ERRORS, pg_unavailable
from ingest.contract.errors import NotSent, Outage, OutcomeUnknown, Refused


class Problem(Refused):
    """The route's refusal, in no dialect's shape: its voice renders it."""

    def __init__(
        self, status: int, code: str, message: str = "", headers: dict[str, str] | None = None, **fields: str
    ) -> None:
        super().__init__(f"{status} {code}: {message}" if message else f"{status} {code}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers) if headers else {}
        self.fields = fields


class Down(Outage):
    """The route's 503: what could not answer is ``cause`` (None: Postgres, or a link that
    could not be resolved; logged where it was met)."""

    def __init__(self, cause: BaseException | None = None) -> None:
        super().__init__(f"unavailable: {cause!r}" if cause is not None else "unavailable")
        self.cause = cause


def is_outage(exc: BaseException) -> bool:
    """``exc`` says a part cannot answer now (Redis, as the link room says it; Postgres or
    its driver; a part of ours: a workspace whose move outlasted the wait for its fence): a
    503, never a 500."""
    return isinstance(exc, (NotSent, OutcomeUnknown, Outage, *PG_ERRORS)) or pg_unavailable(exc)


# every error's body of the management API and the batch route: ``{"error": code, "detail":
# text}``, as the Affixo API, seed 003, answers (a docstring would be the document's
# description); need: the scope or key kind a 403 lacked
class ManageError(BaseModel):
    error: str
    detail: str | None = None
    need: str | None = None
