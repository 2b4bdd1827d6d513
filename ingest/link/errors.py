"""The link room's boundary for errors: what redis-py raises, and the error replies it
hands back in a command's slot, become ``ingest.contract.errors``' classes here, so nothing
above the link (the batcher, the edge's routes, the spool's drain) sees a redis-py error.

- a reply that is an error (``ResponseError`` and its kinds: OOM, READONLY, NOSCRIPT, a
  script's own ``error_reply``): ``Rejected``, a ``NotSent``. The command did not run; its
  ``code`` is the reply's first word (``OOM``, ``GONE``, ``STALE``, ``NOSCRIPT`` ...).
- a round trip that failed (a timeout, a connection lost or refused, a protocol error, a
  cluster that cannot be mapped, any other redis-py error): ``OutcomeUnknown`` with the
  reason ``Unknown.LOST``. What was written may still run when a stalled Redis resumes.
- a tree error passes as it is, and so does anything else (a bug is not an outage).

The links (``ingest.link.choice``) are behind it; so is a call the edge makes on a redis-py
client of its own (the key cache's fill), through ``through``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from redis._parsers.base import BaseParser
from redis.cluster import ClusterParser
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from ingest.contract.connections import client_fault
from ingest.contract.errors import NotSent, OutcomeUnknown, RefstreamError, Unknown

T = TypeVar("T")


class Rejected(NotSent):
    """Redis answered the command with an error: it did not run, as if never sent.
    ``code``: the reply's first word (``OOM``, ``READONLY``, ``NOSCRIPT``, ``GONE``, ``ERR``
    ...); the message is redis-py's (without the code where redis-py has a class for it)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code if code is not None else _first_word(message)


def _first_word(message: str) -> str:
    word = message.split(" ", 1)[0] if message else ""
    return word if word.isupper() else "ERR"


# redis-py's class for an error reply -> the code it took off the message (``parse_error``)
_CODES: dict[type[BaseException], str] = {
    cls: code
    for code, cls in {**BaseParser.EXCEPTION_CLASSES, **ClusterParser.EXCEPTION_CLASSES}.items()
    if isinstance(cls, type) and cls is not ResponseError
}


def rejected(reply: BaseException) -> Rejected:
    """An error reply (redis-py's exception for it) as the tree's."""
    if isinstance(reply, Rejected):
        return reply
    out = Rejected(str(reply), _CODES.get(type(reply)))
    out.__cause__ = reply
    return out


def translated(exc: BaseException) -> BaseException:
    """``exc``, raised below the link, as the tree's (module doc); else ``exc`` itself."""
    if isinstance(exc, RefstreamError):
        return exc
    if isinstance(exc, ResponseError):
        return rejected(exc)
    if isinstance(exc, RedisError | RedisClusterException | OSError) or client_fault(exc):
        out = OutcomeUnknown(f"{type(exc).__name__}: {exc}", Unknown.LOST)
        out.__cause__ = exc
        return out
    return exc


def replies(raw: Sequence[Any]) -> list[Any]:
    """A round trip's replies with each error reply as ``Rejected``, in its slot or in an
    array a script answered (a merged script's calls: ``ingest.edge.scripts``)."""
    out = list(raw)
    _within(out)
    return out


def _within(items: list[Any]) -> None:
    for i, r in enumerate(items):
        if isinstance(r, Exception):
            if not isinstance(r, RefstreamError):
                items[i] = translated(r)
        elif type(r) is list:
            _within(r)


def impossible(message: str) -> OutcomeUnknown:
    """A reply that cannot be the answer to the command it came for (its shape is wrong):
    the connection is out of step with its commands, or the server misbehaves. Whatever was
    sent may have run: an outcome unknown (``Unknown.REPLY``), as for a timeout."""
    return OutcomeUnknown(message, Unknown.REPLY)


async def through(call: Awaitable[T]) -> T:
    """``call``, a redis-py client's, with its errors the tree's (``translated``)."""
    try:
        return await call
    except Exception as exc:
        raise translated(exc) from exc
