"""``refstream archive``: every accepted entry, byte for byte, into immutable segments.

The archiver is a process role beside the workers: its own consumer group (``archive``)
on every partition, created from id 0, so the trim (``workers/consumer/trim.py``) keeps every entry
until the archive has acked it as it keeps them for the workers. Several archivers share
the group as workers share theirs. The loop (one reader per partition, own pending entries
first, reclaim, claims kept, hand-back on SIGTERM, outages waited out, a full Redis
included, state published) is ``workers/group/member.py``'s ``Member``, which the consumer shares.

Each partition gathers entries into a segment (``REFSTREAM_ARCHIVE_SEGMENT_ENTRIES``
entries, or ``REFSTREAM_ARCHIVE_SEGMENT_S`` after its first, one file per hour of append
time: ``workers/archive/segment.py``), writes it durably (``archive_store.py``), and only
then XACKs its entries. An outage of the object store is waited out with the entries held;
on SIGTERM the segment in hand is written and acked, or handed back if an outage holds it.

The entries of an erased person are the one exception to "byte for byte": the archiver
reads the erasure ledger in Postgres before each upload and after it, and writes them
scrubbed (``workers/archive/erased.py``); while Postgres is away it holds the segment, as
it holds one while the store is away.

No line is archived twice:

- The entries a segment gathers stay claimed by this archiver while it gathers and writes
  them (the member resets their idle time every ``claim_idle_ms / 3``), so no other
  archiver reclaims them meanwhile; ``refstream archive`` refuses a claim idle time at or
  below the segment age (``Settings.archive_conflict``).
- Each write holds its partition's lock in the store (``Store.lock``) from its look at its
  claims to its upload's landing. In it, the segment keeps only the entries still pending
  in this archiver, their claims reset in the same script (``Claims.hold``), then every
  entry is looked up in the archive, and those a segment holds already are acked without
  being written again (an archiver died after its upload and before its XACK, or was
  stopped while another took its entries over and wrote them). Another archiver that has
  taken this one's entries over meanwhile (this one stopped past ``claim_idle_ms``, or a
  Sentinel failover that lost their delivery handed them to the group afresh) looks only
  once the lock is let go, and finds them written. A segment rewritten with the same
  entries has the same name and the same bytes.
- The lock is a local store's ``flock``; S3 has none, so there an archiver stopped in
  its upload for longer than ``claim_idle_ms``, while another takes its entries over and
  writes them, can still leave a second copy.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import asyncpg
import structlog

from ingest.contract.connections import Redis, create_pg_pool, pg_outage
from ingest.contract.keys import Keys, parse_id
from ingest.contract.settings import Settings
from ingest.ledger.placement import Moved, Placement
from workers.archive import erased
from workers.archive import segment as seg
from workers.archive.store import ArchiveLocked, ArchiveUnavailable, Store
from workers.group import CHUNK, Member, Part, text
from workers.group import Entry as Read
from workers.group.errors import BatchOutage, redis_outage

log = structlog.get_logger("workers.archive")

GROUP = "archive"
Entry = tuple[str, dict[bytes, bytes]]


@dataclass(slots=True)
class Totals:
    segments: int = 0
    entries: int = 0  # lines written
    already: int = 0  # entries found in a segment already: acked, not rewritten


class Archiver:
    def __init__(self, settings: Settings, redis: Redis, store: Store, *, name: str) -> None:
        self.settings = settings
        self.keys = Keys(settings.stream_prefix, settings.partitions)
        self.redis = redis
        self.store = store
        self.name = name
        self.totals = Totals()
        self._pg: asyncpg.Pool | None = None  # the directory's (made at the first segment)
        self._placement: Placement | None = None  # each workspace's shard: its erasure ledger's
        # how long a write waits for another archiver's on its partition before it counts as
        # an outage (the segment held, status showing why): half the claims' idle time
        self._lock_wait_s = settings.claim_idle_ms / 2000
        self.member = Member(
            settings,
            redis,
            group=GROUP,
            name=name,
            part=self._part,
            role="archive",
            presence_name=self.presence_name,
            reclaim_count=settings.archive_segment_entries,
            totals=lambda: {
                "segments": self.totals.segments,
                "entries": self.totals.entries,
                "already": self.totals.already,
            },
        )

    @property
    def presence_name(self) -> str:
        """Its row in ``refstream status``'s workers table: ``archive:<name>``."""
        return f"{GROUP}:{self.name}"

    async def ensure_groups(self) -> None:
        """The archive group on every partition, from id 0: every entry still in Redis."""
        await self.member.ensure_groups()

    async def run(self, *, drain: bool = False) -> None:
        """Archive every partition until ``stop()``; with ``drain``, until the group has
        read and acked everything."""
        log.info("archive.store", consumer=self.name, store=self.store.url)
        try:
            await self.member.run(drain=drain)
        finally:
            await asyncio.shield(self.close())

    def stop(self) -> None:
        """Stop reading; each partition writes and acks the segment in hand, then returns."""
        self.member.stop()

    def _part(self, p: int, stream: str) -> Part:
        return _Segment(self, p, stream)

    async def write(self, p: int, stream: str, entries: list[Entry]) -> None:
        """One segment of ``entries`` (one partition, one hour), less those no longer
        pending in this archiver (another holds them: it writes them) and those the archive
        holds already, then every one of them acked."""
        ids = [sid for sid, _ in entries]
        # the ledger's first look, before the lock and the claims are held: they are held
        # from the look at the claims to the upload's landing, no longer
        entries = await self._checked(entries)
        async with self.store.lock(f"{self.keys.prefix}/{p}", self._lock_wait_s):
            mine = await self.member.claims.hold(stream, ids)  # theirs alone for claim_idle_ms
            if lost := len(ids) - len(mine):
                log.warning("archive.claims_lost", stream=stream, consumer=self.name, entries=lost)
                entries = [e for e in entries if e[0] in mine]
                ids = [sid for sid, _ in entries]
                if not ids:
                    return
            found = await self._archived(p, ids)
            fresh = [e for e in entries if e[0] not in found]
            rows = fresh
            while rows:  # and its look after the upload: an erasure committed meanwhile (workers/archive/erased.py)
                manifest, data = await asyncio.to_thread(seg.build, p, rows)
                await self.store.put(seg.name(self.keys.prefix, p, manifest.first_id, manifest.last_id), data)
                written, rows = rows, await self._checked(rows)
                if rows == written:
                    break
        for i in range(0, len(ids), CHUNK):
            await self.redis.xack(stream, GROUP, *ids[i : i + CHUNK])
        self.totals.segments += 1 if fresh else 0
        self.totals.entries += len(fresh)
        self.totals.already += len(found)
        if found:
            log.info("archive.already_written", stream=stream, entries=len(found))

    async def _checked(self, rows: list[Entry]) -> list[Entry]:
        """``rows`` with an erased person's entries scrubbed; an outage while Postgres is away
        (the segment is held: nothing is archived unchecked)."""
        try:
            if self._pg is None:
                self._pg = await create_pg_pool(self.settings, min_size=1, max_size=2)
                self._placement = Placement.over(self.settings, self._pg, max_size=2)
            assert self._placement is not None
            out, n = await erased.scrubbed_by_shard(self._placement.by_pool, rows, met=True)
        except Exception as exc:
            # a workspace moved away while its erasure learned (``erasure.learn``): held, and
            # checked again where the directory places it now
            if (reason := "moved" if isinstance(exc, Moved) else pg_outage(exc)) is None:
                raise
            raise BatchOutage(reason, exc) from exc
        if n:
            log.info("archive.scrubbed", entries=n)
        return out

    async def close(self) -> None:
        """Let go of the ledger's connections."""
        if self._placement is not None:
            await self._placement.close()
            self._placement = None
        if self._pg is not None:
            await self._pg.close()
            self._pg = None

    async def _archived(self, p: int, ids: list[str]) -> set[str]:
        """Which of ``ids`` (of partition ``p``) some segment holds already: the segments of
        their hours whose id range covers any of them are read."""
        want = {parse_id(sid): sid for sid in ids}
        low, high = min(want), max(want)
        found: set[str] = set()
        for hour in sorted({seg.hour_of(sid) for sid in ids}):
            for key in await self.store.list(f"{self.keys.prefix}/{hour}/"):
                parsed = seg.parse_name(key)
                if parsed is None or parsed[0] != p or parsed[1] > high or parsed[2] < low:
                    continue
                if not any(parsed[1] <= i <= parsed[2] for i in want):
                    continue
                _, lines = seg.read(await self.store.get(key))
                found.update(e.id for e in lines if parse_id(e.id) in want)
        return found


class _Segment(Part):
    """One partition's segment in the making: gathered until full or old enough, then
    written (one file per hour) and acked."""

    def __init__(self, archiver: Archiver, p: int, stream: str) -> None:
        self.a, self.p, self.stream = archiver, p, stream
        self.limit, self.max_age = archiver.settings.archive_segment_entries, archiver.settings.archive_segment_s
        self.buf: dict[str, dict[bytes, bytes]] = {}
        self.since = 0.0  # when its first entry was read
        self.final = False  # draining, nothing more to read: written without waiting

    def room(self) -> int:
        if self.buf and (self.final or len(self.buf) >= self.limit or time.monotonic() - self.since >= self.max_age):
            return 0
        return self.limit - len(self.buf)

    def block_ms(self) -> int | None:
        return int((self.since + self.max_age - time.monotonic()) * 1000) if self.buf else None

    def take(self, entries: list[Read], again: bool) -> None:
        if entries and not self.buf:
            self.since = time.monotonic()
        for sid, fields in entries:
            self.buf.setdefault(text(sid), fields or {})

    def held(self) -> list[str]:
        return list(self.buf)

    def drop(self, ids: set[str]) -> None:
        for sid in ids:
            self.buf.pop(sid, None)

    def quiet(self) -> None:
        self.final = bool(self.buf)

    async def settle(self) -> None:
        while self.buf:
            entries = sorted(self.buf.items(), key=lambda e: parse_id(e[0]))
            hour = seg.hour_of(entries[0][0])
            chunk = [e for e in entries if seg.hour_of(e[0]) == hour]
            try:
                await self.a.write(self.p, self.stream, chunk)
            except ArchiveLocked as exc:
                raise BatchOutage("archive_locked", exc) from exc
            except ArchiveUnavailable as exc:
                raise BatchOutage("archive_unavailable", exc) from exc
            except Exception as exc:
                if (reason := redis_outage(exc)) is None:
                    raise
                raise BatchOutage(reason, exc) from exc
            for sid, _ in chunk:
                self.buf.pop(sid, None)
        self.final = False
