"""``refstream archive``: every accepted entry, byte for byte, into immutable segments.

The archiver is a process role beside the workers: its own consumer group (``archive``)
on every partition, created from id 0, so the trim (``workers/trim.py``) keeps every entry
until the archive has acked it as it keeps them for the workers. Several archivers share
the group as workers share theirs; one reader task per partition (a multi-stream read is
a cross-slot command on a cluster).

Each reader gathers entries into a segment (``REFSTREAM_ARCHIVE_SEGMENT_ENTRIES`` entries,
or ``REFSTREAM_ARCHIVE_SEGMENT_S`` after its first, one file per hour of append time:
``workers/archive_segment.py``), writes it durably (``archive_store.py``), and only then
XACKs its entries. Outages of Redis or of the object store are waited out with the
entries held and kept claimed (XCLAIM JUSTID: no delivery counted), so no other archiver
takes them meanwhile; on SIGTERM the segment in hand is written and acked, or handed back
if an outage holds it.

No line is archived twice. Entries read fresh (``>``) were never in any segment. Entries
read again (this consumer's own pending ones, or claimed from an archiver that died) may
have been written by it after its upload and before its XACK: before writing, the reader
looks in the archive for segments of that partition and hour whose range covers them,
and acks (without writing) those already there. A segment rewritten with the same entries
has the same name and the same bytes, so even that rewrite leaves one copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import structlog
from redis.exceptions import ResponseError

from ingest.connections import Redis
from ingest.keys import Keys, parse_id
from ingest.settings import Settings

from . import archive_segment as seg
from . import presence
from .archive_store import ArchiveUnavailable, Store
from .consume import HAND_BACK_IDLE_MS, Backoff
from .errors import redis_outage

log = structlog.get_logger("workers.archive")

GROUP = "archive"
Entry = tuple[str, dict[bytes, bytes]]


@dataclass(slots=True)
class Totals:
    segments: int = 0
    entries: int = 0  # lines written
    already: int = 0  # entries read again and found in a segment already: acked, not rewritten


class Archiver:
    def __init__(self, settings: Settings, redis: Redis, store: Store, *, name: str) -> None:
        self.settings = settings
        self.keys = Keys(settings.stream_prefix, settings.partitions)
        self.redis = redis
        self.store = store
        self.name = name
        self.totals = Totals()
        self._stopping = False
        self._backlog = [True] * settings.partitions
        self._backlog_from = ["0"] * settings.partitions
        self._blocked: dict[int, tuple[str, float]] = {}  # partition -> (outage reason, since)
        self._publish_now = asyncio.Event()

    async def ensure_groups(self) -> None:
        """The archive group on every partition, from id 0: every entry still in Redis."""
        for stream in self.keys.streams:
            try:
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def run(self, *, drain: bool = False) -> None:
        """Archive every partition until ``stop()``; with ``drain``, until the group has
        read and acked everything."""
        backoff, waiting = Backoff(first=0.5, cap=5.0), None
        while True:
            try:
                await self.ensure_groups()
                break
            except Exception as exc:
                if (reason := redis_outage(exc)) is None:
                    raise
                if reason != waiting:
                    log.warning("redis.unavailable", reason=reason, error=repr(exc))
                    waiting = reason
                if self._stopping:
                    return
                await backoff.sleep()
        log.info("archive.start", consumer=self.name, store=self.store.url, drain=drain)
        readers = [asyncio.create_task(self._partition(p, drain)) for p in range(self.keys.partitions)]
        housekeeping = None if drain else asyncio.create_task(self._housekeeping())
        try:
            await asyncio.gather(*readers)
        except BaseException:
            self._stopping = True
            await asyncio.gather(*readers, return_exceptions=True)
            raise
        finally:
            if housekeeping is not None:
                housekeeping.cancel()
                await asyncio.gather(housekeeping, return_exceptions=True)
        await self._leave()
        log.info("archive.stop", consumer=self.name, segments=self.totals.segments, entries=self.totals.entries,
                 already=self.totals.already)  # fmt: skip

    def stop(self) -> None:
        """Stop reading; each reader writes and acks the segment in hand, then returns."""
        self._stopping = True

    # -- one partition ----------------------------------------------------------------

    async def _partition(self, p: int, drain: bool) -> None:
        stream = self.keys.stream(p)
        buf: dict[str, dict[bytes, bytes]] = {}
        suspect: set[str] = set()
        since = 0.0
        backoff, failure = Backoff(), None
        limit, max_age = self.settings.archive_segment_entries, self.settings.archive_segment_s
        while True:
            quiet = False
            if not (buf and (self._stopping or len(buf) >= limit or time.monotonic() - since >= max_age)):
                if self._stopping:
                    return
                try:
                    block = max(10, min(self.settings.block_ms, int((since + max_age - time.monotonic()) * 1000)))
                    got, again = await self._read(p, stream, limit - len(buf), block if buf else None)
                    if failure is not None:
                        log.info("archive.read_resumed", stream=stream)
                        failure = None
                except Exception as exc:
                    if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                        with contextlib.suppress(Exception):
                            await self.ensure_groups()  # the stream was deleted under us: from id 0 again
                    if (reason := redis_outage(exc)) is None:
                        raise
                    if reason != failure:
                        log.warning("archive.read_failed", stream=stream, reason=reason, error=repr(exc))
                        failure = reason
                    self._backlog[p], self._backlog_from[p] = True, "0"
                    await backoff.sleep()
                    continue
                backoff.reset()
                if got and not buf:
                    since = time.monotonic()
                for sid, fields in got:
                    buf.setdefault(sid, fields)
                    if again:
                        suspect.add(sid)
                quiet = not got and not self._backlog[p]
                if quiet and drain and not buf and await self._drained(stream):
                    return
                if not (quiet and drain and buf):
                    continue
            if not await self._seal(p, stream, sorted(buf.items(), key=lambda e: parse_id(e[0])), suspect):
                return  # stopping during an outage: handed back
            buf, suspect = {}, set()

    async def _read(self, p: int, stream: str, count: int, block: int | None) -> tuple[list[Entry], bool]:
        """(entries, read again): this consumer's pending entries first, then new ones."""
        if self._backlog[p]:
            reply = await self.redis.xreadgroup(GROUP, self.name, {stream: self._backlog_from[p]}, count=count)
            entries = _entries(reply)
            if not entries:
                self._backlog[p] = False
                return [], True
            self._backlog_from[p] = entries[-1][0]
            return entries, True
        reply = await self.redis.xreadgroup(
            GROUP, self.name, {stream: ">"}, count=count, block=block or self.settings.block_ms
        )
        return _entries(reply), False

    async def _seal(self, p: int, stream: str, entries: list[Entry], suspect: set[str]) -> bool:
        """Write ``entries`` (one segment per hour), then ack them; outages waited out.
        False when stopping during an outage: the entries are handed back instead."""
        by_hour: dict[str, list[Entry]] = {}
        for e in entries:
            by_hour.setdefault(seg.hour_of(e[0]), []).append(e)
        hours = list(by_hour.values())
        backoff, failure = Backoff(first=0.2, cap=5.0), None
        refreshed = time.monotonic()
        while hours:
            try:
                await self._write(p, stream, hours[0], suspect)
            except Exception as exc:
                reason = "archive_unavailable" if isinstance(exc, ArchiveUnavailable) else redis_outage(exc)
                if reason is None:
                    raise
                if reason != failure:
                    log.warning("archive.write_failed", stream=stream, reason=reason, error=repr(exc))
                    failure = reason
                    self._block(p, reason)
                held = [sid for hour in hours for sid, _ in hour]
                if self._stopping:
                    await self._claim(stream, held, idle=HAND_BACK_IDLE_MS)
                    log.info("archive.handed_back", stream=stream, entries=len(held))
                    return False
                if time.monotonic() - refreshed > self.settings.claim_idle_ms / 3000:
                    await self._claim(stream, held)
                    refreshed = time.monotonic()
                await backoff.sleep()
                continue
            if failure is not None:
                log.info("archive.write_resumed", stream=stream)
                failure = None
                self._block(p, None)
            hours.pop(0)
        return True

    async def _write(self, p: int, stream: str, entries: list[Entry], suspect: set[str]) -> None:
        ids = [sid for sid, _ in entries]
        again = [sid for sid in ids if sid in suspect]
        found = await self._archived(p, again) if again else set()
        fresh = [e for e in entries if e[0] not in found]
        if fresh:
            manifest, data = await asyncio.to_thread(seg.build, p, fresh)
            await self.store.put(seg.name(self.keys.prefix, p, manifest.first_id, manifest.last_id), data)
        for i in range(0, len(ids), 10_000):
            await self.redis.xack(stream, GROUP, *ids[i : i + 10_000])
        self.totals.segments += 1 if fresh else 0
        self.totals.entries += len(fresh)
        self.totals.already += len(found)
        if found:
            log.info("archive.already_written", stream=stream, entries=len(found))

    async def _archived(self, p: int, ids: list[str]) -> set[str]:
        """Which of ``ids`` (of partition ``p``) some segment holds already."""
        want = {parse_id(sid): sid for sid in ids}
        found: set[str] = set()
        for hour in sorted({seg.hour_of(sid) for sid in ids}):
            for key in await self.store.list(f"{self.keys.prefix}/{hour}/"):
                parsed = seg.parse_name(key)
                if parsed is None or parsed[0] != p or not any(parsed[1] <= i <= parsed[2] for i in want):
                    continue
                _, lines = seg.read(await self.store.get(key))
                found.update(e.id for e in lines if parse_id(e.id) in want)
        return found

    async def _claim(self, stream: str, ids: list[str], *, idle: int = 0) -> None:
        """Reset the idle time of held entries (JUSTID: no delivery counted), so no other
        archiver's reclaim takes them; with ``idle`` set high, hand them back instead."""
        try:
            for i in range(0, len(ids), 10_000):
                chunk: list[Any] = ids[i : i + 10_000]
                await self.redis.xclaim(stream, GROUP, self.name, 0, chunk, idle=idle or None, justid=True)
        except Exception as exc:
            log.debug("archive.claim_failed", stream=stream, error=repr(exc))

    async def _drained(self, stream: str) -> bool:
        groups = await self.redis.xinfo_groups(stream)
        group = next((g for g in groups if _s(g["name"]) == GROUP), None)
        if group is None:
            return False
        if group["pending"]:
            await self.reclaim()
            return False
        info = await self.redis.xinfo_stream(stream)
        return parse_id(group["last-delivered-id"]) >= parse_id(info["last-generated-id"])

    # -- housekeeping -----------------------------------------------------------------

    async def reclaim(self) -> int:
        """Claim entries idle past ``claim_idle_ms`` in other (dead) archivers."""
        claimed = 0
        for p, stream in enumerate(self.keys.streams):
            start = "0-0"
            for _ in range(1000):
                reply = await self.redis.xautoclaim(
                    stream, GROUP, self.name, min_idle_time=self.settings.claim_idle_ms, start_id=start,
                    count=self.settings.archive_segment_entries,
                )  # fmt: skip
                if reply[1]:
                    self._backlog[p], self._backlog_from[p] = True, "0"
                    claimed += len(reply[1])
                start = _s(reply[0])
                if start == "0-0":
                    break
        if claimed:
            log.info("archive.reclaimed", consumer=self.name, entries=claimed)
        return claimed

    def _block(self, p: int, reason: str | None) -> None:
        """Partition ``p`` is held by an outage (``reason``), or no longer (None)."""
        if reason is None:
            self._blocked.pop(p, None)
        elif p not in self._blocked or self._blocked[p][0] != reason:
            self._blocked[p] = (reason, time.time())
        self._publish_now.set()

    def state(self) -> dict[str, Any]:
        """What ``refstream status`` shows in its workers table, as ``archive:<name>``."""
        reasons = sorted({r for r, _ in self._blocked.values()})
        since = min((t for _, t in self._blocked.values()), default=None)
        return {"consumer": self.name, "state": "blocked" if reasons else "running", "reasons": reasons,
                "since": since, "segments": self.totals.segments, "entries": self.totals.entries}  # fmt: skip

    @property
    def presence_name(self) -> str:
        return f"{GROUP}:{self.name}"

    async def _housekeeping(self) -> None:
        """Reclaim what dead archivers left, and publish this archiver's state, each on its
        own timer (and the state at once on a change)."""
        next_reclaim = next_state = 0.0
        while not self._stopping:
            now = time.monotonic()
            if now >= next_reclaim:
                next_reclaim = now + self.settings.reclaim_every_s
                await self._safely("reclaim", self.reclaim())
            if now >= next_state or self._publish_now.is_set():
                self._publish_now.clear()
                next_state = now + presence.EVERY_S
                await self._safely("state", presence.publish(self.redis, self.keys, self.presence_name, self.state()))
            try:
                await asyncio.wait_for(self._publish_now.wait(), max(0.05, min(next_reclaim, next_state) - now))
            except TimeoutError:
                pass

    async def _safely(self, what: str, step: Any) -> None:
        try:
            await step
        except Exception as exc:
            log.warning("housekeeping.failed", task=what, error=repr(exc))

    async def _leave(self) -> None:
        """A clean stop removes this archiver's state, and it from the group where it holds nothing."""
        try:
            await presence.forget(self.redis, self.keys, self.presence_name)
            for stream in self.keys.streams:
                consumers = await self.redis.xinfo_consumers(stream, GROUP)
                mine = next((c for c in consumers if _s(c["name"]) == self.name), None)
                if mine is not None and int(mine["pending"]) == 0:
                    await self.redis.xgroup_delconsumer(stream, GROUP, self.name)
        except Exception as exc:
            log.warning("archive.leave_failed", error=repr(exc))


def _entries(reply: Any) -> list[Entry]:
    rows = reply[0][1] if reply else []
    return [(_s(sid), fields or {}) for sid, fields in rows]


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
