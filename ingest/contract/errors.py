"""refstream's errors, one tree, rooted in what the caller does next.

Every error refstream raises on purpose is a ``RefstreamError``, and under it one of:

- ``NotSent``: nothing of the request reached the server, so nothing happened there. Send
  it again, or spool it (the edge), or retry the batch (a worker).
- ``OutcomeUnknown``: the request left and no answer says whether it took effect (a lost
  connection, a commit in flight, a reply out of step, a confirmation that did not come).
  Answer "may be stored" (503 with ``Refstream-Outcome: unknown``); a keyed retry is safe,
  because every write is idempotent.
- ``Outage``: a part is down or cannot confirm for now. Wait, with a backoff, and try
  again; never blame an entry for it.
- ``Refused``: the request itself is wrong (a body, a range, a key, what it names). Answer
  the caller's 4xx in the route's own shape; sending it again as it is fails again.
- ``Misconfigured``: a setting or the machine is wrong. Say which and stop; fix and restart.

Where a client library's handlers must keep catching an error (``except RedisError`` in an
outage handler, ``except OSError`` around Postgres, ``except ValueError`` in a parser), the
leaf takes that base too, beside its branch here: ``class RedisDown(NotSent,
RedisConnectionError)``. The branch says what to do; the library's base, where it came
from.
"""

from __future__ import annotations

from redis.exceptions import RedisError


class RefstreamError(Exception):
    """An error refstream raises on purpose: one of the branches below."""


class NotSent(RefstreamError):
    """Nothing of the request reached the server: retry, or spool."""


class OutcomeUnknown(RefstreamError):
    """The request may have taken effect: answer "may be stored"."""


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
