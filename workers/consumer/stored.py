"""An event as the batch transaction knows it once its row is in: what the counter,
customer, milestone and webhook stages each read."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from ingest.contract.events import Envelope, EventType
from ingest.contract.links import LinkInfo


# not frozen: a frozen dataclass sets each field through object.__setattr__, and one is
# made for every event a batch stores (1.2 µs against 0.25); compared and hashed by
# identity, as one event's is one object
@dataclass(slots=True, eq=False)
class Stored:
    envelope: Envelope
    link: LinkInfo
    at: datetime
    is_bot: bool
    visitor_key: str | None  # who, for unique clicks: the visitor id, or a hash of IP and UA
    out_of_window: bool = False
    ip: str | None = None  # as stored (the workspace's ip_policy applied)
    bot_reason: str | None = None

    @property
    def type(self) -> EventType:
        return self.envelope.type

    def text(self, key: str) -> str | None:
        v = self.envelope.payload.get(key)
        return v if isinstance(v, str) else None


def ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)
