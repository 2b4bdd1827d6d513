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
  above ``yield_backlog`` or its oldest entry is ``yield_lag_ms`` older than live work keeps
  it alone (``import_lane``); it keeps its working time (reading rows and writing them) to
  ``share`` of the wall clock (after a batch that took t, it rests t * (1 - share) / share);
  and the command lowers its own CPU priority (``nice``), so that the edge's and the
  workers' processes on the same machine come first.
- **No side effects** unless asked: no webhooks, no fraud rules, and its rows earn no
  commissions (its events were paid for, flagged or not, in the system they come from).
  The ledger still follows the rules whatever the flags: an imported refund of a live
  sale claws its commission back, a live sale an imported lead attributes earns, and an
  imported lead or sale is the customer's first all the same (``workers.consumer.commissions``).
- **Refusals, counted by reason**, never stored: rows that do not read (``invalid``),
  clicks, leads and sales before the retention's first day (``past_retention``: their
  days' partitions are gone, and a sale of 1970 is a timestamp's wrong unit) or ahead of
  Postgres's clock (``future``), a link the workspace lacks (``unknown_link``), a lead
  naming neither a click the source imported nor a link (``unknown_click``, ``no_link``),
  a listed visitor, customer or address (``suppressed``), a refund of a sale not stored
  (``sale_not_found``) or past its amount (``refund_exceeds_sale``), a refund id used for
  another refund (``refund_id_reused``); and, from the batch itself, clicks on an
  inactive link (``inactive_link``).
- **Bounded memory, whatever the file**: one batch of rows in memory; what must outlive a
  batch, the clicks a later lead names, is in Postgres (``import_clicks``).
- **Stopped, it says where to go on**: ``stop`` ends the run after the batch in flight;
  ``Summary.resume_line`` is the line a run with ``start_line`` goes on from.
- **Erased people stay erased**: the batch checks the erasure ledger as the workers do, so
  an erased person's imported rows are stored without their personal data (``scrubbed``).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, timedelta
from typing import Any
from uuid import UUID

import asyncpg
import structlog

from ingest.contract import clicks
from ingest.contract.earnings import IMPORT_DIALECT
from ingest.contract.events import Envelope, EventType
from ingest.ledger import refunds
from ingest.privacy.suppressed import Suppressed
from workers.consumer import partitions, store
from workers.consumer.enrich import Enricher
from workers.consumer.stored import ts
from workers.group.errors import retried_in_place
from workers.ops import import_clicks
from workers.ops.import_formats import Bad, Row
from workers.ops.import_lane import Gate, LiveBacklog, Told, Waiting

__all__ = ["Importer", "LiveBacklog", "Options", "Summary", "Told", "Waiting", "event_id"]

log = structlog.get_logger("workers.imports")

DIALECT = IMPORT_DIALECT
FUTURE_SLACK_MS = 300_000  # a row this far ahead of Postgres's clock is refused
EXAMPLES = 5  # refused rows shown per reason
LINKS_KEPT = 10_000  # link codes remembered (the workspace's or not); past that, forgotten and asked again


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
    start_line: int = 1  # rows starting before this line are skipped (a resumed import)

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
    live_floor_ms: int = 0  # the highest lag live work kept alone, measured while it waited (0: none)
    seconds: float = 0.0
    skipped: int = 0  # rows before ``start_line``: not read again
    resume_line: int = 1  # every row before this line is done (stored, known or refused)
    finished: bool = False  # read to the end of the file; else stopped (``resume_line``)

    def refuse(self, reason: str, line: int, detail: str = "") -> None:
        self.refused[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES:
            shown.append(f"line {line}: {detail}" if detail else f"line {line}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "stored": self.stored,
            "duplicates": self.duplicates,
            "scrubbed": self.scrubbed,
            "refused": dict(sorted(self.refused.items())),
            "refused_total": sum(self.refused.values()),
            "examples": self.examples,
            "waited_s": round(self.waited_s, 3),
            "rested_s": round(self.rested_s, 3),
            "behind": self.behind,
            "share_low": round(self.share_low, 3),
            "live_floor_ms": self.live_floor_ms,
            "seconds": round(self.seconds, 3),
            "skipped": self.skipped,
            "finished": self.finished,
            "resume_line": None if self.finished else self.resume_line,
        }


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


class Importer:
    """Rows to Postgres, a batch at a time, in its lane. ``stop`` set (the command's Ctrl-C)
    ends the run after the batch in flight, with ``summary.resume_line`` where a rerun with
    ``start_line`` goes on; the run ends the same way, having stored nothing, when it is
    cancelled. ``tell`` hears each long wait for live work."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        opts: Options,
        backlog: LiveBacklog,
        enricher: Enricher | None = None,
        progress: Callable[[Summary], None] | None = None,
        stop: asyncio.Event | None = None,
        tell: Callable[[Told], None] | None = None,
    ) -> None:
        self.pool, self.opts, self.backlog, self.enricher = pool, opts, backlog, enricher
        self.progress = progress
        self.stop = stop or asyncio.Event()
        self.summary = Summary(resume_line=opts.start_line)
        self.gate = Gate(backlog, opts.yield_backlog, opts.yield_lag_ms, opts.share, tell)
        self._links: dict[str, bool] = {}  # code -> the workspace's (True) or not (False)
        self._days: set[date] = set()
        self._suppressed = Suppressed()
        self._first_kept_ms = 0
        self._now_ms = 0
        self._since_rest = time.monotonic()  # the duty cycle counts reading and writing alike

    async def run(self, rows: Iterable[Row | Bad]) -> Summary:
        started = time.monotonic()
        s = self.summary
        try:
            await self._read_bounds()
            await self._suppressed.read(self.pool, only=self.opts.workspace_id)  # its own list alone
            batch: list[Row] = []
            for r in rows:
                if r.line < self.opts.start_line:
                    s.skipped += 1
                    continue
                if isinstance(r, Bad):
                    s.read += 1
                    s.refuse(r.reason, r.line, r.detail)
                    if not batch:
                        s.resume_line = r.line + 1  # done: no batch before it in flight
                    continue
                batch.append(r)
                if len(batch) >= self.opts.batch_size:
                    if not await self._flush(batch):
                        return s
                    batch = []
                    s.resume_line = r.line + 1
            if batch and not await self._flush(batch):
                return s
            s.finished = True
            return s
        finally:
            s.seconds = time.monotonic() - started
            if self.progress is not None:
                self.progress(s)

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

    async def _flush(self, rows: list[Row]) -> bool:
        """The batch, once live work lets it go; False (nothing written) when stopped first."""
        behind, waited_s = await self.gate.give_way(self.stop)
        s = self.summary
        s.waited_s += waited_s
        s.behind += behind
        s.share_low = min(s.share_low, self.gate.share)
        s.live_floor_ms = max(s.live_floor_ms, self.gate.floor_ms)
        if behind:
            self._since_rest = time.monotonic()  # a wait is no work: the cycle starts after it
        if self.stop.is_set():
            return False
        await self._know_links({r.fields["link"] for r in rows if "link" in r.fields})
        named = {r.fields["click"] for r in rows if r.kind == "lead" and "click" in r.fields}
        o = self.opts
        known = await import_clicks.find(self.pool, o.workspace_id, o.source, named)
        envelopes: list[Envelope] = []
        refund_rows: list[Row] = []
        batch_clicks: list[tuple[str, UUID]] = []
        for r in rows:
            s.read += 1
            if r.at_ms > self._now_ms + FUTURE_SLACK_MS:
                s.refuse("future", r.line, f"{ts(r.at_ms).isoformat()} is ahead of Postgres's clock")
            elif r.kind == "refund":
                refund_rows.append(r)
            elif (e := self._envelope(r, known)) is not None:
                if self._suppressed.names(e):
                    s.refuse("suppressed", r.line)
                    if e.type is EventType.CLICK:  # kept nowhere: a lead naming it names an unknown click
                        known.pop(r.id, None)
                else:
                    envelopes.append(e)
                    if e.type is EventType.CLICK:
                        batch_clicks.append((r.id, e.event_id))
        days = {partitions.uuid_day(e.event_id) for e in envelopes if e.type is not EventType.SALE} - self._days
        if days:
            async with self.pool.acquire() as conn:
                await partitions.ensure_days(conn, days, partitions.ms_day(self._first_kept_ms))
            self._days |= days
        if envelopes:
            # fenced: a workspace moved to another shard is never written where it was
            result = await store.write_batch(self.pool, envelopes, self.enricher, o.effects(), fence=[o.workspace_id])
            s.stored += result.inserted
            s.duplicates += result.duplicates
            s.scrubbed += result.scrubbed
            for code in result.unknown_codes:  # a link deleted since it was looked up
                s.refuse("unknown_link", 0, code)
            for code in result.inactive_codes:
                s.refuse("inactive_link", 0, code)
            # after the commit: a click a crash leaves unmapped is mapped by the rerun, which finds it stored
            await import_clicks.remember(self.pool, o.workspace_id, o.source, batch_clicks)
        for r in refund_rows:
            await self._refund(r)
        rest = self.gate.rest_s(time.monotonic() - self._since_rest)
        if rest:
            await asyncio.sleep(rest)  # the duty cycle itself, not a synchronisation
            s.rested_s += rest
        self._since_rest = time.monotonic()
        if self.progress is not None:
            self.progress(s)
        return True

    async def _know_links(self, codes: set[str]) -> None:
        unknown = sorted(codes - self._links.keys())
        if not unknown:
            return
        async with self.pool.acquire() as conn:
            found = await conn.fetch("SELECT code, workspace_id::text AS ws FROM links WHERE code = ANY($1)", unknown)
        mine = {r["code"] for r in found if r["ws"] == self.opts.workspace_id}
        if len(self._links) + len(unknown) > LINKS_KEPT:
            self._links.clear()  # bounded: a file of many links asks again, a batch at a time
        for code in unknown:
            self._links[code] = code in mine

    def _envelope(self, r: Row, known: dict[str, import_clicks.Click]) -> Envelope | None:
        """The row as a stream entry would carry it; None, and counted, when refused.
        ``known``: the clicks the batch's leads name, by source id (a click of this batch
        joins them)."""
        o, f = self.opts, r.fields
        eid = event_id(o.workspace_id, o.source, r.kind, r.id, r.at_ms)
        if r.at_ms < self._first_kept_ms:  # a sale too: one of 1970 is a unit's mistake, not history
            self.summary.refuse("past_retention", r.line, f"{ts(r.at_ms).isoformat()} is before the retention")
            return None
        if r.kind == "sale":
            payload = {
                "external_id": f["customer_id"],
                "amount": f["amount"],
                "currency": f["currency"],
                "name": f["event_name"],
                "processor": f["payment_processor"],
            }
            for key, name in (("invoice", "invoice_id"), ("lead_name", "lead_event_name"), ("metadata", "metadata")):
                if name in f:
                    payload[key] = f[name]
            return Envelope(EventType.SALE, DIALECT, payload, o.workspace_id, event_id=eid, received_at_ms=r.at_ms)
        if r.kind == "click":
            if not self._links.get(f["link"]):
                self.summary.refuse("unknown_link", r.line, f["link"])
                return None
            visitor = f.get("visitor_id") or _visitor(eid)
            known[r.id] = import_clicks.Click(eid, f["link"], visitor)
            payload = {"code": f["link"], "visitor_id": visitor}
            if "referrer" in f:
                payload["referrer"] = f["referrer"]
            return Envelope(
                EventType.CLICK,
                DIALECT,
                payload,
                o.workspace_id,
                f.get("ip"),
                f.get("user_agent"),
                event_id=eid,
                received_at_ms=r.at_ms,
            )
        payload = {"name": f["event_name"], "external_id": f["customer_id"]}
        click = known.get(f["click"]) if "click" in f else None
        if click is not None:
            payload |= {
                "code": click.code,
                "click_id": clicks.mint(click.event_id),
                "visitor_id": click.visitor or _visitor(click.event_id),
            }
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
            o.workspace_id,
            f.get("refund_id") or r.id,
            None,
            invoice_id=f["invoice_id"],
            amount=f.get("amount"),
            reason=f.get("reason"),
            dialect=DIALECT,
        )
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


def _visitor(click_id: UUID) -> str:
    """The visitor of an imported click that names none: one per click."""
    return "imp_" + hashlib.blake2b(click_id.bytes, digest_size=12).hexdigest()
