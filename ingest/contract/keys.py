"""Every Redis key refstream uses, in one place.

Keys that a multi-key command, transaction or script touches together must share a hash
tag (the part in braces) so that they land in one Redis Cluster slot. Each stream
partition carries its own tag so the partitions spread over the cluster's nodes; the one
multi-key script, an idempotent append, touches a stream and a record of its tag.
"""

from __future__ import annotations

import hashlib
import zlib

GROUP = "workers"  # the consumer group every worker joins


def parse_id(raw: object) -> tuple[int, int]:
    """A stream entry id (``b"1700000000000-3"``) as (milliseconds, sequence), for ordering."""
    s = raw.decode() if isinstance(raw, bytes) else str(raw)
    ms, _, seq = s.partition("-")
    return int(ms), int(seq or 0)


class Keys:
    """``partitions`` is the number the edges write (``ingest.contract.layout``: it may change
    while a process runs, through ``resize``)."""

    __slots__ = ("partitions", "prefix", "streams")

    def __init__(self, prefix: str, partitions: int) -> None:
        self.prefix = prefix
        self.partitions = partitions
        self.streams: tuple[str, ...] = tuple(self.stream(p) for p in range(partitions))

    def resize(self, partitions: int) -> None:
        """Route by ``partitions`` from now on (a live change of the partition count)."""
        if partitions != self.partitions:
            self.partitions = partitions
            self.streams = tuple(self.stream(p) for p in range(partitions))

    def stream(self, partition: int) -> str:
        return f"{self.prefix}:events:{{{partition}}}"

    def partition_for(self, routing_key: str, partitions: int | None = None) -> int:
        """Stable partition for a routing key (a link code), so one link's events stay in
        order; among ``partitions`` (default: the current count)."""
        return zlib.crc32(routing_key.encode()) % (partitions or self.partitions)

    @staticmethod
    def partition_of(stream: str) -> int | None:
        """The partition a stream key names (``...:events:{3}`` is 3), None for another key."""
        head, _, tag = stream.rpartition(":events:{")
        return int(tag[:-1]) if head and tag.endswith("}") and tag[:-1].isdigit() else None

    def stream_for(self, routing_key: str) -> str:
        return self.streams[self.partition_for(routing_key)]

    def attempts(self, partition: int) -> str:
        """Per partition: how many times each pending entry was taken into a batch after its
        first delivery and not finished (a worker crashed on it). Beside its stream's tag."""
        return f"{self.prefix}:attempts:{{{partition}}}"

    @property
    def layout(self) -> str:
        """The partition layout (``ingest.contract.layout``): how many the edges write, which
        ones the workers read."""
        return f"{self.prefix}:layout"

    def retired(self, partition: int) -> str:
        """Set when partition ``partition`` was retired (drained and deleted): no append and
        no group creation may make its stream again. Beside its stream's tag."""
        return f"{self.prefix}:retired:{{{partition}}}"

    def revived(self, partition: int) -> str:
        """When a grow last made partition ``partition`` (Redis's ms): a retire that read the
        layout before that time leaves it. Beside its stream's tag."""
        return f"{self.prefix}:revived:{{{partition}}}"

    @property
    def workers(self) -> str:
        """Each worker's state (running, or blocked and why), for ``refstream status``."""
        return f"{self.prefix}:workers"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    # a workspace's waiting room: its events a shard could not take yet (workers.consumer.
    # waiting), and the set that names every room; one tag, so a script reads both
    @property
    def waiting_rooms(self) -> str:
        return f"{self.prefix}:wait:{{rooms}}"

    def waiting_room(self, workspace_id: str) -> str:
        return f"{self.prefix}:wait:{{rooms}}:{workspace_id}"

    # every rate limiter's name: an erasure deletes the windows its person's addresses name
    LIMITERS = ("click", "public", "key", "trackclick")

    def ratelimit(self, route: str, subject: str) -> str:
        return f"{self.prefix}:rate:{route}:{subject}"  # a list (``rl:`` held a sorted set)

    def link(self, code: str) -> str:
        return f"{self.prefix}:link:{code}"

    @property
    def links_warm(self) -> str:
        """Set once the link cache holds every link: a miss then means "no such code"."""
        return f"{self.prefix}:links:warm"

    def flag(self, feature: str) -> str:
        return f"{self.prefix}:flag:{feature}"

    def apikey(self, sha256_hex: str) -> str:
        return f"{self.prefix}:apikey:{sha256_hex}"

    def click(self, click_id: str) -> str:
        return f"{self.prefix}:click:{click_id}"

    def fingerprint(self, workspace_id: str, fingerprint_hash: str) -> str:
        return f"{self.prefix}:fp:{workspace_id}:{fingerprint_hash}"

    def fingerprints_of(self, workspace_id: str, visitor: bytes) -> str:
        """The fingerprint cache's entries that name one visitor (a set of their hashes),
        named by the visitor's ledger digest (``ingest.contract.erasure.digest``), never the
        visitor id: what an erasure's sweep reads to reach them, written beside each entry
        (``ingest.contract.erasure_index``)."""
        return f"{self.prefix}:fpv:{workspace_id}:{visitor.hex()}"

    def answers(self, workspace_id: str) -> str:
        """A workspace's idempotency records of keyed events, by their events (a sorted set:
        the event's time; its id, partition and record's digest), so that an erasure's sweep
        reads the records of the person's own events, never every record
        (``ingest.contract.erasure_index``). Beside ``answers_filed``'s tag."""
        return f"{self.prefix}:ans:{{{workspace_id}}}"

    def answers_filed(self, workspace_id: str) -> str:
        """The same members as ``answers``, by when Redis filed them (its clock): what a
        filing prunes by, so that an edge's clock never decides what leaves the index."""
        return f"{self.prefix}:ans:{{{workspace_id}}}:filed"

    def answers_before(self, workspace_id: str) -> str:
        """The index an edge wrote before ``answers`` (pruned by its events' times): read by
        the sweep and deleted with its workspace, written no more; it expires a window
        after its last filing."""
        return f"{self.prefix}:answers:{workspace_id}"

    def entries_of(self, workspace_id: str, digest: bytes) -> str:
        """The stream entries that name one identifier (a set of ``partition:entry id``), named
        by its ledger digest: the entries an erasure's sweep cannot find by their event's time,
        because they were appended long after it (a spool drained late, a Redis that ran a
        stalled append late, an edge whose clock was off), because no row holds their event
        (a link gone before it was stored), or because they are a second copy of an event.
        Written by the workers (``workers.consumer.pipeline``)."""
        return f"{self.prefix}:erasure:entries:{workspace_id}:{digest.hex()}"

    def deferred(self, workspace_id: str, external_id: str) -> str:
        """A deferred lead's click, for the lead that completes it (``ingest.edge.lead``):
        named by a digest of the customer's id, never the id itself (key names are listed
        by whoever can SCAN)."""
        digest = hashlib.sha256(f"{workspace_id}\x1f{external_id}".encode()).hexdigest()[:32]
        return f"{self.prefix}:deferred:{workspace_id}:{digest}"

    def seen_click(self, code: str, identity_hash: str) -> str:
        """The click id a browser (its address and User-Agent) was given on a link within
        the hour (Dub's ``POST /track/click``): a reload is answered, not counted again."""
        return f"{self.prefix}:seenclick:{code}:{identity_hash}"

    def seen_click_claim(self, code: str, identity_hash: str) -> str:
        """Held (``SET NX``, for moments) by the request that appends a browser's first click
        on a link, so that its double's waits for ``seen_click`` instead of counting again."""
        return f"{self.prefix}:seenclaim:{code}:{identity_hash}"

    def idempotency(self, scope: str, key: str) -> str:
        return f"{self.prefix}:idem:{scope}:{key}"

    def idempotent(self, digest: str, partition: int | None = None, workspace: str | None = None) -> str:
        """A client idempotency key's record (ingest/edge/idempotency.py). With a partition it
        carries that stream's tag: the script that appends the event touches both. With the
        workspace whose request it answers (``...:idk:{3}:<workspace>:<digest>``): an
        erasure's sweep rewrites an answer in that workspace's terms alone
        (``workers.ops.erasure``), never another's that names the same client-chosen id."""
        own = f"{workspace}:{digest}" if workspace else digest
        if partition is None:
            return f"{self.prefix}:idk:{own}"
        return f"{self.prefix}:idk:{{{partition}}}:{own}"

    @staticmethod
    def record_workspace(record: str) -> str | None:
        """The workspace an idempotency record names (``idempotent``), None where it names
        none (a public route's, or a record written before records named theirs)."""
        tail = record.rpartition(":idk:")[2]
        if tail.startswith("{"):
            tail = tail.partition("}:")[2]
        return tail.rpartition(":")[0] or None

    @staticmethod
    def record_partition(record: str) -> int | None:
        """The partition whose tag an idempotency record carries (``...:idk:{3}:...`` is 3)."""
        _, found, rest = record.rpartition(":idk:{")
        tag = rest.partition("}")[0]
        return int(tag) if found and tag.isdigit() else None

    @property
    def arq_queue(self) -> str:
        return f"{self.prefix}:arq:queue"
