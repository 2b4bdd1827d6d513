"""Historical import: another system's clicks, leads, sales and refunds into Postgres, in a
lane of their own (docs/import.md).

- **Each row once.** An event's id is derived from the workspace, the source's name, the
  row's type and its source id, with the row's own time as the UUIDv7's millisecond (so it
  lands in its day's partition and sorts with live events of that day): the same row
  imported twice, or an import stopped and run again from the start, inserts nothing the
  second time and moves nothing (the workers' ``ON CONFLICT``). A refund is keyed by its
  ``refund_id`` (else its source id), a sale with an invoice by ``(workspace, invoice)``,
  as on the live routes.
- **Its own lane.** Nothing goes onto the live streams: the import runs the workers' own
  batch transaction (``store.write_batch``) itself, one batch at a time, and gives way to
  live work: before each batch it reads the live partitions' backlog (entries not yet read
  plus entries read and not acknowledged by the ``workers`` group) and waits while that is
  above ``yield_backlog``; it keeps its working time (reading rows and writing them) to
  ``share`` of the wall clock (after a batch that took t, it rests t * (1 - share) / share);
  and the command lowers its own CPU priority (``nice``), so that the edge's and the
  workers' processes on the same machine come first.
- **No side effects** unless asked: no webhooks, no fraud rules, and its rows earn no
  commissions (its events were paid for, flagged or not, in the system they come from).
  The ledger still follows the rules whatever the flags: an imported refund of a live
  sale claws its commission back, a live sale an imported lead attributes earns, and an
  imported lead or sale is the customer's first all the same (``workers.consumer.commissions``).
- **Refusals, counted by reason**, never stored: rows that do not read (``invalid``),
  clicks and leads before the retention's first day (``past_retention``: their days'
  partitions are gone) or ahead of Postgres's clock (``future``), a link the workspace lacks
  (``unknown_link``), a lead naming neither a click the source imported nor a link
  (``unknown_click``, ``no_link``), a listed visitor, customer or address
  (``suppressed``), a refund of a sale not stored (``sale_not_found``) or past its amount
  (``refund_exceeds_sale``), a refund id used for another refund (``refund_id_reused``);
  and, from the batch itself, clicks on an inactive link (``inactive_link``).
- **Erased people stay erased**: the batch checks the erasure ledger as the workers do, so
  an erased person's imported rows are stored without their personal data (``scrubbed``).
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, timedelta
from typing import Any
from uuid import UUID

import asyncpg
import structlog
from redis.exceptions import ResponseError

from ingest.contract import clicks, layout
from ingest.contract.connections import REDIS_ERRORS, Redis
from ingest.contract.earnings import IMPORT_DIALECT
from ingest.contract.events import Envelope, EventType
from ingest.contract.keys import GROUP, Keys, parse_id
from ingest.edge.suppress import Suppressed
from ingest.manage import refunds
from workers.consumer import partitions, store
from workers.consumer.enrich import Enricher
from workers.consumer.stored import ts
from workers.group.errors import retried_in_place
from workers.ops.import_formats import Bad, Row
from workers.ops.status import group_lag

log = structlog.get_logger("workers.imports")

DIALECT = IMPORT_DIALECT
FUTURE_SLACK_MS = 300_000  # a row this far ahead of Postgres's clock is refused
EXAMPLES = 5  # refused rows shown per reason
MIN_SHARE = 0.02  # the least share the import comes down to while live work waits
SHARE_STEP = 0.02  # the share regained after each batch that did not wait
TELL_AFTER_S = 5.0  # a wait for live work this long is logged (once per wait)


@dataclass(frozen=True, slots=True)
class Options:
    workspace_id: str
    source: str  # the system the rows come from: part of every derived id
    webhooks: bool = False
    fraud: bool = False
    commissions: bool = False
    batch_size: int = 500
    yield_backlog: int = 1000  # live entries waiting above which the import waits
    yield_lag_ms: int = 20  # the oldest live entry waiting longer than this makes it wait (0: never)
    share: float = 0.5  # of the wall clock, at most, spent in the import's transactions
    retention_days: int = 90
    partitions: int = 4  # REFSTREAM_PARTITIONS, where Redis holds no layout

    def effects(self) -> store.Effects:
        return store.Effects(
            webhooks=self.webhooks, fraud=self.fraud, commissions=self.commissions, imported=True, counters_last=True
        )


@dataclass(slots=True)
class Summary:
    read: int = 0
    stored: int = 0
    duplicates: int = 0
    scrubbed: int = 0  # of the stored: an erased person's, without their personal data
    refused: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> "line N: detail"
    waited_s: float = 0.0  # given way to live work
    rested_s: float = 0.0  # kept to its share
    behind: int = 0  # batches held back because live work waited
    share_low: float = 1.0  # the least share it came down to
    seconds: float = 0.0

    def refuse(self, reason: str, line: int, detail: str = "") -> None:
        self.refused[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES:
            shown.append(f"line {line}: {detail}" if detail else f"line {line}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "read": self.read, "stored": self.stored, "duplicates": self.duplicates, "scrubbed": self.scrubbed,
            "refused": dict(sorted(self.refused.items())), "refused_total": sum(self.refused.values()),
            "examples": self.examples, "waited_s": round(self.waited_s, 3), "rested_s": round(self.rested_s, 3),
            "behind": self.behind, "share_low": round(self.share_low, 3),
            "seconds": round(self.seconds, 3),
        }  # fmt: skip


def event_id(workspace_id: str, source: str, kind: str, source_id: str, at_ms: int) -> UUID:
    """A UUIDv7 whose millisecond is the row's and whose 74 other bits are a digest of what
    names the row: the same row always has the same id."""
    text = f"import\x1f{workspace_id}\x1f{source}\x1f{kind}\x1f{source_id}"
    rand = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=10).digest(), "big")
    value = (at_ms & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76
    value |= ((rand >> 64) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & 0x3FFF_FFFF_FFFF_FFFF
    return UUID(int=value)


@dataclass(frozen=True, slots=True)
class _Click:
    """What a lead naming an imported click takes from it."""

    event_int: int
    code: str
    visitor: str


@dataclass(frozen=True, slots=True)
class Waiting:
    """Live work waiting for the workers: entries (not yet read, or read and not acknowledged)
    and the age of the oldest of them, by Redis's clock (0 when none waits)."""

    entries: int = 0
    oldest_ms: int = 0


class LiveBacklog:
    """The live partitions' backlog in the ``workers`` group: what the import gives way to.
    Redis unreachable counts as none (the edges spool, the workers wait: nothing to give way
    to), said once."""

    def __init__(self, redis: Redis | None, keys: Keys, partitions: int) -> None:
        self.redis, self.keys, self.partitions = redis, keys, partitions
        self._failing = False

    async def entries(self) -> int:
        return (await self.waiting()).entries

    async def waiting(self) -> Waiting:
        if self.redis is None:
            return Waiting()
        try:
            shape = await layout.load(self.redis, self.keys, self.partitions)
            secs, micros = await self.redis.time()
            now_ms = int(secs) * 1000 + int(micros) // 1000
            total, oldest = 0, now_ms
            for p in range(shape.span):
                stream = self.keys.stream(p)
                try:
                    groups = await self.redis.xinfo_groups(stream)
                except ResponseError as exc:
                    if "no such key" not in str(exc):
                        raise
                    continue  # a partition no edge has written yet
                for g in groups:
                    if (g["name"].decode() if isinstance(g["name"], bytes) else g["name"]) != GROUP:
                        continue
                    last = (await self.redis.xinfo_stream(stream))["last-generated-id"] if g.get("lag") is None else 0
                    lag, _ = await group_lag(self.redis, stream, g, last)
                    total += lag + int(g["pending"])
                    if int(g["pending"]):
                        first = (await self.redis.xpending(stream, GROUP))["min"]
                        oldest = min(oldest, parse_id(first)[0]) if first is not None else oldest
                    if lag:
                        unread = await self.redis.xrange(stream, min="(" + _text(g["last-delivered-id"]), count=1)
                        oldest = min(oldest, parse_id(unread[0][0])[0]) if unread else oldest
        except (*REDIS_ERRORS, KeyError) as exc:
            if not self._failing:
                log.warning("import.backlog_unread", error=repr(exc))
            self._failing = True
            return Waiting()
        self._failing = False
        return Waiting(total, max(0, now_ms - oldest))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Importer:
    def __init__(
        self, pool: asyncpg.Pool, opts: Options, backlog: LiveBacklog, enricher: Enricher | None = None,
        progress: Callable[[Summary], None] | None = None,
    ) -> None:  # fmt: skip
        self.pool, self.opts, self.backlog, self.enricher = pool, opts, backlog, enricher
        self.progress = progress
        self.summary = Summary()
        self._clicks: dict[bytes, _Click] = {}
        self._links: dict[str, bool] = {}  # code -> the workspace's (True) or not (False)
        self._days: set[date] = set()
        self._suppressed = Suppressed()
        self._first_kept_ms = 0
        self._now_ms = 0
        self._since_rest = time.monotonic()  # the duty cycle counts reading and writing alike
        self._share = opts.share  # the duty cycle now (``_give_way``)

    async def run(self, rows: Iterable[Row | Bad]) -> Summary:
        started = time.monotonic()
        await self._read_bounds()
        await self._suppressed.read(self.pool)
        batch: list[Row] = []
        for r in rows:
            self.summary.read += 1
            if isinstance(r, Bad):
                self.summary.refuse(r.reason, r.line, r.detail)
                continue
            batch.append(r)
            if len(batch) >= self.opts.batch_size:
                await self._flush(batch)
                batch = []
        if batch:
            await self._flush(batch)
        self.summary.seconds = time.monotonic() - started
        if self.progress is not None:
            self.progress(self.summary)
        return self.summary

    async def _read_bounds(self) -> None:
        """The retention's first day (the later of the recorded horizon and Postgres's day
        less the retention) and Postgres's now."""
        async with self.pool.acquire() as conn:
            now = await conn.fetchval("SELECT clock_timestamp()")
            horizon = await conn.fetchval("SELECT horizon_id FROM event_retention")
        self._now_ms = int(now.timestamp() * 1000)
        first_kept = now.astimezone(UTC).date() - timedelta(days=self.opts.retention_days)
        self._first_kept_ms = partitions.day_ms(first_kept)
        if horizon is not None:
            self._first_kept_ms = max(self._first_kept_ms, horizon.int >> 80)

    def _digest(self, source_id: str) -> bytes:
        return hashlib.blake2b(source_id.encode(), digest_size=12).digest()

    async def _flush(self, rows: list[Row]) -> None:
        await self._give_way()
        await self._know_links({r.fields["link"] for r in rows if "link" in r.fields})
        envelopes: list[Envelope] = []
        refund_rows: list[Row] = []
        for r in rows:
            if r.at_ms > self._now_ms + FUTURE_SLACK_MS:
                self.summary.refuse("future", r.line, f"{ts(r.at_ms).isoformat()} is ahead of Postgres's clock")
            elif r.kind == "refund":
                refund_rows.append(r)
            elif (e := self._envelope(r)) is not None:
                if self._suppressed.names(e):
                    self.summary.refuse("suppressed", r.line)
                    if e.type is EventType.CLICK:  # kept nowhere: a lead naming it names an unknown click
                        self._clicks.pop(self._digest(r.id), None)
                else:
                    envelopes.append(e)
        days = {partitions.uuid_day(e.event_id) for e in envelopes if e.type is not EventType.SALE} - self._days
        if days:
            async with self.pool.acquire() as conn:
                await partitions.ensure_days(conn, days, partitions.ms_day(self._first_kept_ms))
            self._days |= days
        if envelopes:
            result = await store.write_batch(self.pool, envelopes, self.enricher, self.opts.effects())
            self.summary.stored += result.inserted
            self.summary.duplicates += result.duplicates
            self.summary.scrubbed += result.scrubbed
            for code in result.unknown_codes:  # a link deleted since it was looked up
                self.summary.refuse("unknown_link", 0, code)
            for code in result.inactive_codes:
                self.summary.refuse("inactive_link", 0, code)
        for r in refund_rows:
            await self._refund(r)
        await self._rest(time.monotonic() - self._since_rest)
        self._since_rest = time.monotonic()
        if self.progress is not None:
            self.progress(self.summary)

    def _held_back(self, w: Waiting) -> bool:
        o = self.opts
        return w.entries > o.yield_backlog or (o.yield_lag_ms > 0 and w.oldest_ms > o.yield_lag_ms)

    async def _give_way(self) -> None:
        """Wait while live work waits: more entries than ``yield_backlog``, or one older than
        ``yield_lag_ms``. The share follows (additive increase, multiplicative decrease, as
        TCP's window): halved after a batch that had to wait, grown by ``SHARE_STEP`` after
        one that did not, never above ``opts.share``."""
        waited = time.monotonic()
        pause, behind, told = 0.01, False, False
        while self._held_back(w := await self.backlog.waiting()):
            behind = True
            if not told and time.monotonic() - waited > TELL_AFTER_S:  # a bar standing still says why
                log.info("import.giving_way", entries=w.entries, oldest_ms=w.oldest_ms,
                         yield_backlog=self.opts.yield_backlog, yield_lag_ms=self.opts.yield_lag_ms)  # fmt: skip
                told = True
            await asyncio.sleep(pause)  # a poll of Redis's backlog: nothing to await
            pause = min(pause * 2, 0.5)
        if behind:
            self.summary.behind += 1
            self._share = max(MIN_SHARE, self._share / 2)
            self._since_rest = time.monotonic()  # a wait is no work: the cycle starts after it
        else:
            self._share = min(self.opts.share, self._share + SHARE_STEP)
        self.summary.share_low = min(self.summary.share_low, self._share)
        self.summary.waited_s += time.monotonic() - waited

    async def _rest(self, busy_s: float) -> None:
        if self._share < 1.0 and busy_s > 0:
            rest = busy_s * (1 - self._share) / self._share
            await asyncio.sleep(rest)  # the duty cycle itself, not a synchronisation
            self.summary.rested_s += rest

    async def _know_links(self, codes: set[str]) -> None:
        unknown = sorted(codes - self._links.keys())
        if not unknown:
            return
        async with self.pool.acquire() as conn:
            found = await conn.fetch("SELECT code, workspace_id::text AS ws FROM links WHERE code = ANY($1)", unknown)
        mine = {r["code"] for r in found if r["ws"] == self.opts.workspace_id}
        for code in unknown:
            self._links[code] = code in mine

    def _envelope(self, r: Row) -> Envelope | None:
        """The row as a stream entry would carry it; None, and counted, when refused."""
        o, f = self.opts, r.fields
        eid = event_id(o.workspace_id, o.source, r.kind, r.id, r.at_ms)
        if r.kind == "sale":
            payload = {"external_id": f["customer_id"], "amount": f["amount"], "currency": f["currency"],
                       "name": f["event_name"], "processor": f["payment_processor"]}  # fmt: skip
            for key, name in (("invoice", "invoice_id"), ("lead_name", "lead_event_name"), ("metadata", "metadata")):
                if name in f:
                    payload[key] = f[name]
            return Envelope(EventType.SALE, DIALECT, payload, o.workspace_id, event_id=eid, received_at_ms=r.at_ms)
        if r.at_ms < self._first_kept_ms:
            self.summary.refuse("past_retention", r.line, f"{ts(r.at_ms).isoformat()} is before the retention")
            return None
        if r.kind == "click":
            if not self._links.get(f["link"]):
                self.summary.refuse("unknown_link", r.line, f["link"])
                return None
            visitor = f.get("visitor_id") or "imp_" + hashlib.blake2b(eid.bytes, digest_size=12).hexdigest()
            self._clicks[self._digest(r.id)] = _Click(eid.int, sys.intern(f["link"]), visitor)
            payload = {"code": f["link"], "visitor_id": visitor}
            if "referrer" in f:
                payload["referrer"] = f["referrer"]
            return Envelope(EventType.CLICK, DIALECT, payload, o.workspace_id, f.get("ip"), f.get("user_agent"),
                            event_id=eid, received_at_ms=r.at_ms)  # fmt: skip
        payload = {"name": f["event_name"], "external_id": f["customer_id"]}
        click = self._clicks.get(self._digest(f["click"])) if "click" in f else None
        if click is not None:
            payload |= {"code": click.code, "click_id": clicks.mint(UUID(int=click.event_int)),
                        "visitor_id": click.visitor}  # fmt: skip
        elif "link" in f:
            if not self._links.get(f["link"]):
                self.summary.refuse("unknown_link", r.line, f["link"])
                return None
            payload["code"] = f["link"]
        else:
            reason = "unknown_click" if "click" in f else "no_link"
            self.summary.refuse(reason, r.line, f.get("click", "a lead names a click or a link"))
            return None
        for key in ("email", "customer_name", "avatar", "metadata"):
            if key in f:
                payload[key] = f[key]
        return Envelope(EventType.LEAD, DIALECT, payload, o.workspace_id, event_id=eid, received_at_ms=r.at_ms)

    async def _refund(self, r: Row) -> None:
        o, f = self.opts, r.fields
        asked = refunds.Asked.keyed(
            o.workspace_id, f.get("refund_id") or r.id, None, invoice_id=f["invoice_id"], amount=f.get("amount"),
            reason=f.get("reason"), dialect=DIALECT,
        )  # fmt: skip
        eid = event_id(o.workspace_id, o.source, "refund", r.id, r.at_ms)

        async def record() -> refunds.Refunded:
            async with self.pool.acquire() as conn:
                # its clawback whatever --commissions says: a sale that earned gives back the refunded share
                return await refunds.record(conn, asked, refund_id=eid, at=ts(r.at_ms), notify=o.webhooks)

        try:
            done = await retried_in_place(record, "refund")
        except refunds.SaleNotFound as exc:
            self.summary.refuse("sale_not_found", r.line, str(exc))
            return
        except refunds.RefundTooLarge as exc:
            self.summary.refuse("refund_exceeds_sale", r.line, str(exc))
            return
        except refunds.KeyReused:
            self.summary.refuse("refund_id_reused", r.line, asked.key.removeprefix("id:"))
            return
        if done.made:
            self.summary.stored += 1
        else:
            self.summary.duplicates += 1
