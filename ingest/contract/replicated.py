"""A write that the XACK (or XDEL) after it must not outlive: at
``REFSTREAM_ACK_DURABILITY=replicas:N`` it is sent with a WAIT for N replicas on its own
connection, and the ack follows only once they hold it.

Such writes are the erasure sweep's filing of an entry (``workers.consumer.erased.filed``),
a dead letter (``workers.consumer.dead_letters``), an event parked in its workspace's
waiting room (``workers.consumer.waiting``), and a letter an operator requeues or drops
(``workers.ops.dead``: the letter's XDEL follows). On one primary, replication and the AOF
are a prefix of its history, so an ack cannot survive without the write sent before it. A
failover between the two breaks that. The write went to the old primary, and is lost with
it. The ack went to the promoted replica, which keeps it. The entry is then acked with its
filing, its letter or its room's copy gone. (The generative test's ``erased_kept`` of two
stream entries, seed 2113448591 under Sentinel: filed nowhere, acked, raw after the
erasure.)

Short of N, ``Unreplicated`` (an outage): the entry stays pending and is read again, and its
write sent again (a letter stays, and the operator's command fails). A filing is a set
member, so it is the same twice. A letter or a parked copy sent twice is stored once, by
its event id.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster

from ingest.contract.connections import Command, Redis
from ingest.contract.errors import Unreplicated
from ingest.contract.primaries import Primaries


class Replicated:
    """Sends a worker's writes on ``redis``; ``replicas`` (0: none) the replicas each must
    reach, within ``wait_ms``."""

    def __init__(self, redis: Redis, replicas: int, wait_ms: int) -> None:
        self.redis, self.replicas, self.wait_ms = redis, replicas, wait_ms
        self._primaries: Primaries | None = None  # on a Redis Cluster at replicas:N

    async def send(self, commands: Sequence[Command], what: str = "the write an ack or a delete follows") -> list[Any]:
        """The replies to ``commands``, sent in one round trip (on a Redis Cluster at
        replicas:N, one per slot). Raises the first error among them, and ``Unreplicated``
        when a WAIT counted fewer than N replicas."""
        if not commands:
            return []
        if self.replicas and isinstance(self.redis, RedisCluster):
            return await self._per_slot(commands, what)
        pipe: Any = self.redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        if self.replicas:
            pipe.execute_command("WAIT", self.replicas, self.wait_ms)
        return self._checked(list(await pipe.execute(raise_on_error=False)), what)

    async def _per_slot(self, commands: Sequence[Command], what: str) -> list[Any]:
        """Each slot's commands, and a WAIT, on one connection to its primary (``Primaries``):
        a cluster pipeline sends a keyless WAIT to any node."""
        assert isinstance(self.redis, RedisCluster)
        if self._primaries is None:
            self._primaries = Primaries(self.redis)
        by_slot: dict[int, list[Command]] = {}
        for command in commands:
            by_slot.setdefault(self.redis.keyslot(_key(command)), []).append(command)
        replies: list[Any] = []
        for group in by_slot.values():

            def build(pipe: Any, group: list[Command] = group) -> None:
                for command in group:
                    pipe.execute_command(*command)
                pipe.execute_command("WAIT", self.replicas, self.wait_ms)

            replies += self._checked(await self._primaries.send(str(_key(group[0])), build), what)
        return replies

    def _checked(self, replies: list[Any], what: str) -> list[Any]:
        """``replies`` without the WAIT's; raised: the first error, or too few replicas."""
        if error := next((r for r in replies if isinstance(r, Exception)), None):
            raise error
        if not self.replicas:
            return replies
        acked = int(replies.pop())
        if acked < self.replicas:
            raise Unreplicated(f"{acked} of {self.replicas} replicas have {what} within {self.wait_ms} ms")
        return replies

    async def aclose(self) -> None:
        if self._primaries is not None:
            await self._primaries.aclose()


def _key(command: Command) -> Any:
    """The key a command's slot is of: a script's first key, any other's first argument."""
    if str(command[0]).upper() in ("EVAL", "EVALSHA") and int(command[2]) > 0:
        return command[3]
    return command[1]
