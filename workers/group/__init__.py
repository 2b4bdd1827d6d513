"""One consumer-group member: the loop the consumer and the archiver share.

A ``Member`` belongs to one consumer group on every stream partition. It makes the group
(from id 0, so entries appended before any member ran are read too), runs one reader task
per partition (a multi-stream read would be a cross-slot command on a Redis Cluster),
reclaims what dead members left, keeps its own claims fresh, hands back what an outage
holds when it stops, publishes its state for ``refstream status``, and waits out outages.
What it does with the entries it reads belongs to its user, through one ``Part`` per
partition: the consumer stores a batch in Postgres (``workers/consumer/consume.py``), the archiver
gathers a segment and writes it (``workers/archive/archiver.py``).

A reader first re-reads the member's own pending entries (from id ``0``: what a previous
run under the same name read and never acked, or what ``reclaim`` claimed from a dead
member), then blocks for new ones (id ``>``).

Outages are waited out, never counted against the entries:

- A full (or read-only) Redis refuses ``XGROUP CREATE`` even for a group that exists
  (under ``noeviction`` it is a deny-OOM command; XREADGROUP, XACK, XCLAIM and XAUTOCLAIM
  are not): a group that exists is enough. A group that does not exist is waited for, the
  partition shown as blocked, and created once Redis takes writes again.
- A part whose settling meets an ``BatchOutage`` keeps what it holds and retries with a backoff.
  While Postgres is the cause, no partition reads anything new (``Gate``).
- Everything a part holds (a batch in flight, a segment being gathered) stays claimed by
  this member: every ``claim_idle_ms / 3`` its idle time is reset (XCLAIM JUSTID: no
  delivery counted), so no other member's reclaim takes it meanwhile. Entries another
  member took anyway (this one stalled past ``claim_idle_ms``) are dropped from the part.
- On SIGTERM a part that an outage holds is handed back: marked idle for long, so the next
  reclaim by any member takes it at once.

``member.py`` is the loop, ``joining.py`` the group made, waited for and left, ``reads.py``
the reads (and their WAIT), ``housekeeping.py`` the timers, ``claims.py`` the claims (reclaim,
refresh, hand-back), ``part.py`` what a user supplies (``Part``, ``Chore``).
"""

from workers.group.claims import CHUNK, HAND_BACK_IDLE_MS, id_after, text
from workers.group.member import Member
from workers.group.part import Chore, Entry, Part

__all__ = ["CHUNK", "HAND_BACK_IDLE_MS", "Chore", "Entry", "Member", "Part", "id_after", "text"]
