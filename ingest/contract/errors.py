"""refstream's errors, one tree, rooted in what the caller does next.

Every error refstream raises on purpose is a ``RefstreamError``, and under it one of:

- ``NotSent``: nothing of the request reached the server, so nothing happened there. Send
  it again, or spool it (the edge), or retry the batch (a worker).
- ``OutcomeUnknown``: the request left and no answer says whether it took effect. One class,
  its ``reason`` (``Unknown``) says which way: a connection lost or timed out after the
  write, a reply out of step, a confirmation that did not come, an append neither in Redis
  for sure nor in the spool, a commit in flight. Keep a copy where one can be kept (the
  edge spools it under the same ``event_id``), else answer "may be stored" (503 with
  ``Refstream-Outcome: unknown``); a keyed retry is safe, because every write is idempotent.
- ``Outage``: a part is down or cannot confirm for now. Wait, with a backoff, and try
  again; never blame an entry for it.
- ``Refused``: the request itself is wrong (a body, a range, a key, what it names). Answer
  the caller's 4xx in the route's own shape; sending it again as it is fails again.
- ``Misconfigured``: a setting or the machine is wrong. Say which and stop; fix and restart.

Every class sits on exactly one branch (``tests/test_errors_tree.py``). Where a client
library's handlers must keep catching an error (``except OSError`` around Postgres, ``except
ValueError`` in a parser, a worker's ``except ResponseError`` around its own redis-py client),
the leaf takes that base too, beside its branch here: ``class ConnectionLost(NotSent,
OSError)``. The branch says what to do; the library's base, where it came from.
``OutcomeUnknown`` itself is an ``OSError``: a lost connection's outcome, which every
outage handler around Postgres answers as one.

Above the edge's link to Redis (``ingest.link``) no redis-py error is seen: the link
translates what redis-py raises and the error replies it hands back into this tree
(``ingest.link.errors``), so the edge and the spool catch branches.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from redis.exceptions import RedisError


class RefstreamError(Exception):
    """An error refstream raises on purpose: one of the branches below."""


class NotSent(RefstreamError):
    """Nothing of the request reached the server: retry, or spool."""


class Unknown(enum.Enum):
    """Why an outcome is unknown (``OutcomeUnknown.reason``)."""

    LOST = "lost"  # the connection was lost, or timed out, after the request was written
    REPLY = "reply"  # a reply that cannot answer its command: the connection was out of step
    RERUN = "rerun"  # the round trip ran; its scripts could not be loaded to run the rest
    UNCONFIRMED = "unconfirmed"  # the primary ran it; the durability level's confirmation did not come
    UNKEPT = "unkept"  # an append Redis may hold that the spool could not keep a copy of
    COMMIT = "commit"  # Postgres went away while a COMMIT was in flight


class OutcomeUnknown(RefstreamError, OSError):
    """The request may have taken effect: keep a copy, or answer "may be stored".

    ``reason``: which way (``Unknown``). ``event_id``: the event that may be stored (an
    ``UNKEPT`` append; None for a keyed repeat whose stored copy may be another's).
    ``replies``: for ``UNCONFIRMED``, what the primary answered to the request's own
    commands (empty until the batcher hands the error to one request, ``for_request``),
    so the caller knows what the primary holds."""

    def __init__(
        self, message: str, reason: Unknown, *, event_id: UUID | None = None, replies: Sequence[Any] = ()
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.event_id = event_id
        self.replies = list(replies)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> Any:
        return (_unknown, (str(self), self.reason, self.event_id, self.replies))

    def for_request(self, replies: Sequence[Any]) -> OutcomeUnknown:
        """This outcome for one request of a round trip, with its own replies."""
        return OutcomeUnknown(str(self), self.reason, event_id=self.event_id, replies=replies)

    @property
    def answered_unknown(self) -> bool:
        """Answered "may be stored" (``Refstream-Outcome: unknown``) as it is: no copy was
        kept (``UNKEPT``), or a commit's outcome (``COMMIT``). The others are the link's:
        the edge keeps a copy in the spool before it answers."""
        return self.reason in (Unknown.UNKEPT, Unknown.COMMIT)


def _unknown(message: str, reason: Unknown, event_id: UUID | None, replies: list[Any]) -> OutcomeUnknown:
    return OutcomeUnknown(message, reason, event_id=event_id, replies=replies)


class Outage(RefstreamError):
    """A part is down, or cannot confirm yet: wait and try again."""


class Refused(RefstreamError):
    """The request is wrong as it is: the caller's 4xx."""


class Misconfigured(RefstreamError):
    """A setting or the machine is wrong: say which, stop."""


class NotFound(Refused, LookupError):
    """What a request names does not exist (in the caller's workspace): a route answers 404,
    the command line says so. The management API raises it, and so does the erasure room
    below it, so one ``except`` catches both."""


class Conflict(Refused):
    """The request contradicts what is stored (a name taken, a state that forbids it): 409."""


class Unreplicated(Outage, RedisError):
    """The primary has it, and fewer replicas than ``REFSTREAM_ACK_DURABILITY`` names
    confirmed it in time: a failover could still lose it. Entries a worker read stay pending
    and are read again; a layout change is run again (each of its steps is idempotent)."""
