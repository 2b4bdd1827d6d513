"""Which link a Redis client gets: the edge's own RESP link to a single Redis or Sentinel's
primary, one per primary of a Redis Cluster, else redis-py's pipeline (TLS, a credential
provider); each behind the room's boundary for errors (``ingest.link.errors``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ingest.contract.connections import Redis
from ingest.link.cluster import ClusterLink
from ingest.link.errors import replies, translated
from ingest.link.resp import Command, DirectLink, Link, PipelineLink


class Translated:
    """A link whose errors are the tree's: what it raises and the error replies in its
    slots (``ingest.link.errors``). ``inner``: the link itself."""

    def __init__(self, inner: Link) -> None:
        self.inner = inner

    @property
    def direct(self) -> bool:
        """One server on the edge's own RESP link (its scripts can be merged)."""
        return isinstance(self.inner, DirectLink)

    async def send(self, commands: Sequence[Command]) -> list[Any]:
        try:
            raw = await self.inner.send(commands)
        except Exception as exc:
            raise translated(exc) from exc
        return replies(raw)

    async def load_scripts(self, sources: Sequence[str]) -> None:
        try:
            await self.inner.load_scripts(sources)
        except Exception as exc:
            raise translated(exc) from exc

    def short_of_level(self) -> None:
        self.inner.short_of_level()

    async def close(self) -> None:
        try:
            await self.inner.close()
        except Exception as exc:
            raise translated(exc) from exc


def link_for(redis: Redis) -> Translated:
    return Translated(DirectLink.for_client(redis) or ClusterLink.for_client(redis) or PipelineLink(redis))
