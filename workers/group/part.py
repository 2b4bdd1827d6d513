"""What a member's user supplies: one ``Part`` per partition (what it holds and what it
does with it), and ``Chore``s for its housekeeping."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

Entry = tuple[bytes, dict[bytes, bytes] | None]  # as XREADGROUP returns it (fields None: deleted while pending)


class Part(ABC):
    """What a member's user holds on one partition, and what it does with it. The member
    reads while ``room()`` is above 0 and settles what is held when it is 0 (or when
    stopping); ``settle`` raises ``BatchOutage`` to be called again after a backoff."""

    @abstractmethod
    def room(self) -> int:
        """Entries the next read may add; 0: settle what is held now."""

    @abstractmethod
    def take(self, entries: list[Entry], again: bool) -> None:
        """Entries read (``again``: from this member's own pending ones)."""

    @abstractmethod
    def held(self) -> list[str]:
        """Ids of the entries held: read, not yet acked. The member keeps them claimed."""

    @abstractmethod
    async def settle(self) -> None:
        """Do with what is held what the user does (store, write), ack it, hold nothing."""

    def block_ms(self) -> int | None:
        """How long the next read may wait for new entries (None: the member's default)."""
        return None

    def drop(self, ids: set[str]) -> None:  # noqa: B027 (a hook: most parts have nothing to do)
        """These entries are no longer pending in this member (``Claims.keep``): another
        took them, a failover lost their delivery, or this member acked them meanwhile."""

    def quiet(self) -> None:  # noqa: B027
        """Draining, and nothing more to read: settle what is held without waiting."""

    async def backlog_count(self, after: str, count: int) -> int:
        """How many of this member's pending entries after id ``after`` the next read takes."""
        return count


@dataclass(frozen=True, slots=True)
class Chore:
    """Housekeeping a user adds to the member's own (reclaim, state), on its own timer."""

    name: str
    every_s: float
    step: Callable[[], Awaitable[Any]]
    needs_postgres: bool = False  # skipped (and tried again a second later) while the gate is closed
