"""The checker over one seed's whole history, once everything is healed and drained.

For every event an operation may store (a unit: a click, a lead, a conversion, a sale, each
found by its token), from the outcomes of the operation's attempts:
- ``lost``: accepted (2xx) and not stored, or an accepted answer names an event id that is
  not in Postgres (a lead's or conversion's natural key aside: its first event stands);
- ``duplicate``: stored more often than its attempts allow (a key or a natural key: once;
  otherwise one per accepted attempt, plus at most one per attempt of unknown outcome);
- ``refusal_counted``: stored although every answer it got was a refusal (4xx, 503), or more
  often than its accepted and unknown attempts explain while some were refused;
  ``refused_write_kept``: the same for a management write (a referral code generated);
- ``foreign_answer``: an answer, or a row, that is not its own request's: an echoed code,
  customer, click or visitor of another request, an event id whose row carries another
  token, a row on another link; ``repeat_answers_differ``: two 2xx answers of one key differ;
- ``5xx`` (a 5xx other than a 503 with Retry-After), ``wrong_refusal`` (a 4xx, or a batch
  item refused, for a request that is well formed and whose link and click exist);
- ``unasked_row``: a row no request of the history asked for;
- ``read_back`` (every row reads back whole: it names only dictionary entries that exist,
  and a click's payload, read as GET /v1/events reads it, holds the click id and visitor id
  its columns hold, and an enriched click's referrer domain, read through its referrer or
  its row's copy (schema 26), is the worker's: ``Checker.read_back_problems``); a row's
  User-Agent, read through its entry, is its own request's (``foreign_answer``);
- ``counters`` (every counter equals its rows: ``Checker.counter_problems``), ``ledger``
  (every attributed sale and counted lead earned one commission by the world's rules, and
  nothing else did: ``Checker.ledger_problems``), ``pending``
  (anything pending or undelivered in any group, or spooled), ``dead_letter`` (none is
  planted), ``archive_twice`` (a stream entry in two segment lines), ``archive_missing`` (a
  stored event, or a refund answered 2xx, in no line); ``erased_kept``, ``erasure_pending``
  (an erased customer still somewhere: ``erased.py``); ``burst_unearned``, ``burst_evidence``
  (a click_burst flag whose window does not hold more clicks than its threshold, or whose
  evidence is not where the count stops), ``burst_unjudged`` (a stored click the rule's
  pass after the commit never judged: ``_bursts``), ``burst_twice`` (a click flagged
  click_burst more than once); ``suppressed_stored`` (a click of a
  visitor on the do-not-track list, sent once every edge must have read the list, stored:
  ``_surely_suppressed``); ``process_exit``, ``replay_failed``,
  ``nemesis`` (the run's own);
- Dub's dialect (``ops._dub``, ``careless.draw_dub``): ``deferred_counted`` (a deferred
  lead stored: it stores nothing, ``Unit.never``), ``deferred_forgotten`` (a 400 for a lead
  with an empty ``clickId`` after its customer's deferred lead was answered 2xx),
  ``dub_repeat_counted`` (a browser's click again within the hour answered a new id where
  its first was answered 2xx, no fault keeping Redis from the edges: ``_repeat``),
  ``unattributed`` (a direct sale of a new customer not on its click's link), ``dub_shape``
  (a 4xx not in Dub's error shape); a lead's row counts the quantity it asked for
  (``foreign_answer`` otherwise), and one customer's leads are told apart by their names.

One stored event may be in no line and be no anomaly: an event never answered 2xx (every
attempt 503 "may be stored"), in a run whose Redis failed over (Sentinel), whose stream
entry a worker stored before the failover lost it, and the archiver never saw. A failover
loses what the promoted replica lacks (docs/guarantees.md, the archive); such events are
counted (``lost_with_redis``) and printed, never an event answered 2xx.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingest.contract import wire
from ingest.contract.wire import FIELD, EnvelopeError
from workers.archive import segment as seg
from workers.archive.store import LocalStore

from .._checks import Checker
from . import erased, judge, walls
from .history import Attempt, History, Op, Unit
from .ops import (
    COMMISSION,
    EXPECTED_REFUSALS,
    ITEM_UNKNOWN,
    TOKEN_SQL,
    World,
    answer_problems,
    dub_error_problem,
    named_events,
)

# each row as a read gives it back: its User-Agent through its dictionary entry (schema 20)
# (a lead's name tells one customer's leads apart, ``Unit.name``; its quantity is what its payload
# counts: none is 1)
COPIES = "SELECT substr(dedupe_key, 6) AS copy, event_id FROM event_dedupe WHERE dedupe_key LIKE 'copy:%'"
ROWS = f"""SELECT e.event_id, e.type, l.code, e.click_id, e.visitor_id, {TOKEN_SQL} AS token, e.workspace_id,
       NULL AS customer, event_user_agent(e.user_agent, e.agent_id) AS user_agent, e.name,
       CASE WHEN e.type = 2 THEN coalesce(e.payload->>'quantity', '1') END AS quantity
FROM events e LEFT JOIN links l ON l.id = e.link_id
UNION ALL
SELECT s.event_id, 4, l.code, s.click_id, NULL, s.metadata->>'gen', s.workspace_id, s.customer_external_id, NULL,
       NULL, NULL
FROM sales s LEFT JOIN links l ON l.id = s.link_id"""
# what takes Redis from an edge, or keeps what it wrote from it (a write refused when full, a
# failover): a browser's click again within the hour may then be counted again (``_repeat``)
REDIS_AWAY = ("redis-stall", "redis-kill", "redis-restart", "redis-full", "sentinel-failover")
PROBE_S = 2.0  # after such a fault heals, how long an edge may still answer without Redis (its probe)
# ... and how long a click it spooled (with what it remembers) takes to reach Redis: the
# edge's probe, then its spool's drain in order behind the other spooled events (seed
# 1555431015 in short mode: a click spooled as a stall healed was not yet named 7.4 s on)
SPOOL_DRAIN_S = 10.0
# each click_burst flag of a click whose address is still stored, with the clicks its window
# holds (those without an address, erased since, counted as the flagged one's); a flag is
# an event_flags row (schema 23), an id of a burst_flags row (schema 25: its clicks + 1 the
# evidence's count), or as schemas 18 to 22 kept one the workspace did not
# exclude, on its click's row (burst_clicks, burst_seconds: its evidence's clicks is the
# threshold + 1, where counting stops)
BURSTS = f"""SELECT f.event_id, {TOKEN_SQL} AS token, f.clicks, f.threshold,
       (SELECT count(*) FROM events o
         WHERE o.link_id = e.link_id AND o.type = 1 AND NOT o.test_mode AND (o.ip = e.ip OR o.ip IS NULL)
           AND o.received_at > e.received_at - make_interval(secs => f.window_seconds)
           AND (o.received_at, o.event_id) <= (e.received_at, e.event_id)) AS in_window
FROM (SELECT event_id, (evidence->>'clicks')::int AS clicks, (evidence->>'threshold_clicks')::int AS threshold,
             (evidence->>'window_seconds')::int AS window_seconds
      FROM event_flags WHERE rule = 'click_burst'
      UNION ALL
      SELECT i, clicks + 1, clicks, seconds FROM burst_flags, unnest(ids) AS i
      UNION ALL
      SELECT event_id, burst_clicks + 1, burst_clicks, burst_seconds FROM events WHERE burst_clicks IS NOT NULL) f
JOIN events e ON e.event_id = f.event_id
WHERE e.ip IS NOT NULL"""
# how long after the drain the workers' passes may take to judge what is left (each passes
# every second: workers/consumer/burst_pass.py)
UNJUDGED_WAIT_S = 30.0
# management writes, by the token: a participant's generated code, a link created by code
GENERATED = """SELECT a.external_id AS token, count(DISTINCT l.id) AS links, min(l.code) AS code
FROM affiliates a LEFT JOIN links l ON l.affiliate_id = a.id WHERE a.external_id LIKE 'g%' GROUP BY 1"""
CREATED = "SELECT code AS token, count(*) AS links, min(code) AS code FROM links WHERE code LIKE 'g%' GROUP BY 1"
OUTAGES = ("redis", "pg", "partition", "sentinel", "shard")  # fault kinds a one-shot command may fail under
EXAMPLES = 4
SUPPRESSION_REFRESH_S = 5.0  # REFSTREAM_SUPPRESSION_REFRESH_S's default, which the stage keeps
REFRESH_SLACK_S = 1.5  # the read itself, under load


@dataclass
class Anomalies:
    found: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, kind: str, text: str) -> None:
        self.found[kind].append(text)

    def counts(self) -> Counter[str]:
        return Counter({k: len(v) for k, v in self.found.items()})

    def report(self, limit: int | None = EXAMPLES) -> str:
        out = []
        for kind, texts in sorted(self.found.items()):
            out.append(f"  {kind}: {len(texts)}")
            out.extend("    - " + t.replace("\n", "\n      ") for t in texts[:limit])
        return "\n".join(out)


class GenChecker:
    def __init__(
        self,
        history: History,
        world: World,
        check: Checker,
        archive_root: Path,
        prefix: str,
        logs: list[Path] | None = None,
        outputs: list[str] | None = None,
        edge: str | None = None,
    ) -> None:
        """``logs``: every process's log file; ``outputs``: what the commands printed;
        ``edge``: an edge's base URL, for the reads the checks make as a client (``judge.py``)."""
        self.edge = edge
        self.h, self.world, self.check = history, world, check
        self.archive_root, self.prefix = archive_root, prefix
        self.logs, self.outputs = logs or [], outputs or []
        self.a = Anomalies()
        self.archived_lines = 0
        self.stored = 0
        self.copies: Counter[str] = Counter()  # archive lines per event id (a spool's re-sends)
        self.refunds_accepted: set[str] = set()  # the ids of the refunds answered 2xx
        self.lost_with_redis: list[str] = []  # stored, unarchived, never 2xx'd, Redis failed over
        self.bursts = 0  # click_burst flags judged (``_bursts``)
        self.by_token: dict[str, list[Any]] = {}
        # Dub's clicks again from the same browser within the hour: answered the first's id;
        # counted again, under a fault that took Redis from the edges (``_repeat``)
        self.repeats: Counter[str] = Counter()
        self._roots: dict[int, list[Op]] | None = None  # ``_browser``'s

    def _say(self, kind: str, op: Op, why: str) -> None:
        at = op.attempts[0].at if op.attempts else 0.0
        faults = self.h.faults_around(at, slack=2.0)
        self.a.add(kind, f"{why}\n{op.describe()}" + (f"\nfaults near it: {'; '.join(faults)}" if faults else ""))

    async def run(self, extra: dict[str, list[str]]) -> Anomalies:
        for kind, texts in extra.items():
            for text in texts:
                self.a.add(kind, text)
        forgotten = erased.erasures(self.h)  # an erased person's rows, read back to their tokens
        spaces = self.world.spaces()
        rows = await erased.read_back(self.check, forgotten, await self.check.fetch(ROWS), spaces)
        self.stored = len(rows)
        by_token: dict[str, list[Any]] = defaultdict(list)
        by_event = {r["event_id"].hex: r for r in rows}
        # a keyed copy that lost its key to another copy stands for the stored row: an answer
        # may name it (docs/guarantees.md, *Copies of one key*)
        for r in await self.check.fetch(COPIES):
            if (held := by_event.get(r["event_id"].hex)) is not None:
                by_event.setdefault(r["copy"], held)
        for r in rows:
            by_token[r["token"]].append(r)
        self.by_token = by_token
        tokens: set[str] = set()
        claimed: set[str] = set()  # the rows some unit judged (a lead's of its name, where it has one)
        for op in self.h.ops.values():
            self._answers(op)
            for i, unit in enumerate(op.units):
                tokens.add(unit.token)
                mine = [r for r in by_token.get(unit.token, []) if unit.name is None or r["name"] == unit.name]
                claimed |= {r["event_id"].hex for r in mine}
                self._unit(op, i, unit, mine, by_event)
        for token, found in by_token.items():
            if token not in tokens and not (token or "").endswith("@c"):  # c's: walls.py judges them
                self.a.add("unasked_row", f"{len(found)} row(s) with token {token!r}: {dict(found[0])}")
            elif token in tokens and (others := [r for r in found if r["event_id"].hex not in claimed]):
                names = sorted({str(r["name"]) for r in others})
                self.a.add("unasked_row", f"{len(others)} row(s) of {token!r} named {names}, asked by no request")
        self._attributed()
        await self._generated()
        await self._refunds()
        await self._bursts()
        for text in await self.check.counter_problems():
            self.a.add("counters", text)
        for text in await self.check.read_back_problems():
            self.a.add("read_back", text)
        c = COMMISSION
        for text in await self.check.ledger_problems(
            c["sale_bps"], c["sale_flat"], c["lead_flat"], c["lead_currency"], skip={self.world.rc_program}
        ):  # (the program whose rules change: ``judge.py`` holds it to each row's rules)
            self.a.add("ledger", text)
        for text in await self.check.unsettled():
            self.a.add("pending", text)
        for stream, entry, error in await self.check.dead_letters():
            self.a.add("dead_letter", f"{stream} {entry}: {error[:300]}")
        leads = {r["token"] for r in rows if r["type"] == 2}
        erasure_problems = await erased.problems(self.check, forgotten, self.archive_root, self.prefix, leads, spaces)
        for kind, texts in erasure_problems.items():
            for text in texts:
                self.a.add(kind, text)
        accepted = {
            u.token
            for op in self.h.ops.values()
            for i, u in enumerate(op.units)
            if any(o == "ok" for o, _ in op.unit_outcomes(i))
        }
        # imported rows never pass through a stream (workers/ops/imports.py): no archive line
        imported = {u.token for op in self.h.ops.values() if op.kind == "import" for u in op.units}
        imported |= {r["token"] for r in rows if (r["token"] or "").endswith("@c")}  # c's are imported too
        # a refund answered 2xx has its stream copy archived as well (ingest/edge/refund.py)
        await self._archive(
            {r["event_id"].hex for r in rows if r["token"] not in imported} | self.refunds_accepted,
            {r["event_id"].hex for r in rows if r["token"] not in accepted},
        )
        self._replays()
        for kind, texts in (await judge.problems(self.check, self.h, self.world, self.edge, self.by_token)).items():
            for text in texts:
                self.a.add(kind, text)
        wall_problems = {
            **await walls.problems(self.check, self.h, self.world),
            **walls.scan_logs(self.logs, self.outputs, walls.personal(self.h)),
        }
        for kind, texts in wall_problems.items():
            for text in texts:
                self.a.add(kind, text)
        return self.a

    async def _refunds(self) -> None:
        """Each refund answered 2xx is recorded once, and is the one its answers name; one
        only ever refused is not recorded; no refund was recorded that no request asked for.
        (That a sale's refunds never pass it, and the stats and clawbacks they move:
        ``Checker.counter_problems``, ``Checker.ledger_problems``.)"""
        rows = {r["refund_key"]: r for r in await self.check.fetch("SELECT refund_key, id FROM refunds")}
        asked: set[str] = set()
        for op in self.h.ops.values():
            if op.kind != "refund" or op.skipped is not None:
                continue
            key = "id:" + op.body["refundId"]
            asked.add(key)
            row, oks = rows.get(key), [a for a in op.attempts if a.outcome == "ok"]
            if oks and row is not None:
                self.refunds_accepted.add(row["id"].hex)
            if oks and row is None:
                self._say("lost", op, "a refund answered 2xx is not recorded")
            elif row is not None and any(a.body.get("refund_id") != str(row["id"]) for a in oks):
                self._say("foreign_answer", op, f"a 2xx names another refund than the one recorded ({row['id']})")
            elif row is not None and all(a.outcome == "refused" for a in op.attempts):
                self._say("refused_write_kept", op, f"refused every time, and recorded ({row['id']})")
        for op in self.h.ops.values():  # a refund imported (``tenants.py``): its key, its own
            if op.kind == "import" and op.echo.get("refund") and op.skipped is None:
                asked.add("id:" + op.echo["refund"])
        for key in sorted(rows.keys() - asked):
            self.a.add("unasked_row", f"a refund no request asked for: {key}")

    def _answers(self, op: Op) -> None:
        if op.kind == "suppress-bulk":  # each entry's answers: ``judge.py``
            return
        if op.kind.startswith("dub-"):  # every refusal of Dub's routes in Dub's shape
            for a in op.attempts:
                if a.status is not None and 400 <= a.status < 500 and (why := dub_error_problem(a.status, a.body)):
                    self._say("dub_shape", op, why)
        if op.echo.get("refuse"):  # past a bound every door keeps, an expired key: a 4xx each time, never stored
            for a in op.attempts:
                items_ok = op.kind == "batch" and "ok" in a.items
                if a.outcome == "error":
                    self._say("5xx", op, f"answered {a.status} {a.headers}")
                elif a.outcome == "ok" and (op.kind != "batch" or items_ok):
                    kind = op.echo["refuse"] if isinstance(op.echo["refuse"], str) else "bound_not_enforced"
                    self._say(kind, op, f"to be refused, answered {a.status}")
                elif a.outcome == "refused" and op.echo.get("status") not in (None, a.status) and a.status != 503:
                    self._say("wrong_refusal", op, f"a {a.status}, not the {op.echo['status']} it is due")
            return
        allowed = EXPECTED_REFUSALS | set(op.echo.get("allow", ()))
        for a in op.attempts:
            if a.outcome == "error":
                self._say("5xx", op, f"answered {a.status} {a.headers}")
            elif a.outcome == "refused" and a.status == 400 and "deferred" in op.echo:
                self._forgotten(op, a)
            elif (
                a.outcome == "refused"
                and a.status not in allowed
                and op.kind != "redirect"
                and not (op.kind == "refund" and a.status == 404)
            ):  # its sale not stored yet
                self._say("wrong_refusal", op, f"a {a.status} for a well-formed request")
            elif a.outcome == "ok":
                if problems := answer_problems(op, a, self.world):
                    self._say("foreign_answer", op, "; ".join(problems))
                if op.kind == "batch":
                    for i, r in enumerate(a.body.get("results") or []):
                        if not r.get("ok") and r.get("error") not in ("unavailable", ITEM_UNKNOWN):
                            self._say("wrong_refusal", op, f"item {i} refused: {r}")
        oks = [a for a in op.attempts if a.outcome == "ok"]
        if len(oks) > 1 and (op.key or op.kind == "generate"):
            if op.kind == "batch":
                firsts: dict[int, str] = {}
                for a in oks:
                    for i, e in named_events(op, a).items():
                        if firsts.setdefault(i, e) != e:
                            self._say("repeat_answers_differ", op, f"item {i}: {firsts[i]} then {e}")
            elif any(a.body != oks[0].body for a in oks[1:]):
                self._say("repeat_answers_differ", op, "two 2xx answers of one key differ")

    def _unit(self, op: Op, i: int, unit: Unit, rows: list[Any], by_event: dict[str, Any]) -> None:
        outs = Counter("unknown" if o == "error" else o for o, _ in op.unit_outcomes(i))
        ok, unknown, refused = outs["ok"], outs["unknown"], outs["refused"]
        first: set[str] = set()  # a browser's click again: the ids its first click's answers and rows name
        if op.echo.get("repeat_of") is not None:
            first, ok = self._repeat(op, op.echo["repeat_of"])
        elif op.kind == "dub-click":
            first = self._browsers_click(op, i)
            ok -= sum(1 for o, a in op.unit_outcomes(i) if o == "ok" and _named(op, a, i) in first)
        n = len(rows)
        need, most = (min(ok, 1), 1 if ok or unknown else 0) if unit.once else (ok, ok + unknown)
        if unit.maybe:
            need = 0
        what = f"{unit.kind} {unit.token}: {n} row(s), attempts ok={ok} unknown={unknown} refused={refused}"
        if unit.never:  # a deferred lead: its answer promises a later lead, no row
            if n:
                self._say(unit.never, op, f"stored, though it stores nothing: {what}")
            return
        suppressed = False
        if unit.listed_by is not None:  # a listed visitor's: stored nowhere once every edge has read the list
            surely = self._surely_suppressed(op, unit.listed_by, unit.listed)
            if surely is not None:
                need, suppressed = 0, True  # (an event id its answer names may be stored nowhere)
                if surely and n:
                    self._say("suppressed_stored", op, f"sent past the edges' refresh of the list: {what}")
                    return
        if n < need:
            self._say("lost", op, f"accepted and not stored: {what}")
        elif n > most:
            kind = "refusal_counted" if refused and (not unit.once or not ok) else "duplicate"
            self._say(kind, op, what)
        for outcome, a in op.unit_outcomes(i):
            named = named_events(op, a).get(i) if outcome in ("ok", "unknown") else None
            if named is None or named in first:
                continue
            row = by_event.get(named)
            if row is not None and row["token"] != unit.token:
                self._say("foreign_answer", op, f"answer names event {named}, the row of {row['token']!r}")
            elif (
                row is None and outcome == "ok" and not suppressed and (unit.kind == "click" or not unit.once or n == 0)
            ):
                self._say("lost", op, f"the answer's event {named} is not stored ({what})")
        for row in rows:
            # (an erased person's row holds no User-Agent: the erasure's checks judge it)
            bad = {
                k: row[k]
                for k, v in unit.expect.items()
                if v is not None and _norm(row[k]) != v and not (k == "user_agent" and row[k] is None)
            }
            if unit.code is not None and row["code"] != unit.code:
                bad["code"] = row["code"]
            if bad:
                self._say("foreign_answer", op, f"row {row['event_id']} holds {bad}, not {unit.expect} on {unit.code}")
        if op.kind == "affixo" and "visitor_id" not in unit.expect and rows:
            visitors = {r["visitor_id"] for r in rows}
            for _, a in (x for x in op.unit_outcomes(i) if x[0] == "ok"):
                if isinstance(a.body, dict) and a.body.get("visitor_id") not in visitors:
                    self._say("foreign_answer", op, f"visitor {a.body.get('visitor_id')!r} is not its row's {visitors}")

    def _repeat(self, op: Op, first_n: int) -> tuple[set[str], int]:
        """A Dub click sent again by the same browser to the same link within the hour: each
        2xx names the first click's id (one its answers named, or its row's), storing nothing;
        a new id is a click of this request's own (so the first's own retries are the same
        browser again too). A new id where the first was answered 2xx is ``dub_repeat_counted``,
        unless a fault took Redis from the edges meanwhile (the edge answers without reading
        what it remembered: ``REDIS_AWAY``). The first's ids, and how many new ids were answered."""
        first = self.h.op(first_n)
        if first is None or not first.units:
            return set(), 0
        answered = [named_events(first, a).get(0) for a in first.attempts if a.outcome == "ok"]
        # the browser's clicks on the link: the first's, and those of its repeats sent before
        # this one (one answered a new id where the first's was never answered, say: that
        # click is the browser's then, and a later repeat is rightly answered its id)
        theirs: set[str] = set()
        for o in self._browser(first_n):
            if o.n < op.n and o.units:
                theirs |= {e for a in o.attempts for e in named_events(o, a).values() if e}
                theirs |= {r["event_id"].hex for r in self.by_token.get(o.units[0].token, [])}
        own = {r["event_id"].hex for r in self.by_token.get(op.units[0].token, [])}
        theirs |= self._browsers_click(op, 0)  # a later repeat's click, appended while this one waited
        new: set[str] = set()
        for a in op.attempts:
            if a.outcome != "ok" or (named := named_events(op, a).get(0)) is None:
                continue
            if named in theirs and named not in own:  # (the first's retry may be answered this one's click)
                self.repeats["answered first"] += 1
                continue
            new.add(named)
            # what the edge could know when this one asked: the first's answers before it
            oks = [f for f in first.attempts if f.outcome == "ok" and f.at + (f.took or 0.0) <= a.at]
            if not oks:
                self.repeats["first never answered"] += 1
            elif why := self._redis_away(oks[0], a):
                self.repeats[f"counted again, {why}"] += 1
            else:
                self._say("dub_repeat_counted", op, f"answered {named}, not its first click's {answered}")
        return theirs, len(new)

    def _browsers_click(self, op: Op, i: int) -> set[str]:
        """The ids ``op``'s 2xx answers name that are the rows of the same browser's other
        clicks on the link, asked before the answer came: a click's retry sent after another
        of the browser's appended the browser's click (seed 961163510: three 503s, then the
        repeat's click id), or two of its requests at once, the second waiting for the
        first's name (seed 755306691), is answered that click, storing nothing."""
        out: set[str] = set()
        for outcome, a in op.unit_outcomes(i):
            if outcome != "ok" or (named := _named(op, a, i)) is None:
                continue
            done = a.at + (a.took or 0.0)  # a click asked before this answer came
            others = [o for o in self._browser(op.n) if o.n != op.n and o.units and o.attempts]
            if any(
                named in {r["event_id"].hex for r in self.by_token.get(o.units[0].token, [])}
                for o in others
                if o.attempts[0].at <= done
            ):
                out.add(named)
        return out

    def _browser(self, n: int) -> list[Op]:
        """The Dub clicks of one browser on one link: the op ``n`` goes back to by
        ``repeat_of``, and every op that goes back to it."""
        if self._roots is None:
            self._roots = {}
            for o in self.h.ops.values():
                root = o.n
                while (up := self.h.op(root)) is not None and up.echo.get("repeat_of") is not None:
                    root = up.echo["repeat_of"]
                self._roots.setdefault(root, []).append(o)
        root = n
        while (up := self.h.op(root)) is not None and up.echo.get("repeat_of") is not None:
            root = up.echo["repeat_of"]
        return self._roots.get(root, [])

    def _redis_away(self, first: Attempt, again: Attempt) -> str | None:
        """Whether the edge could not know the first click when it answered ``again``: a fault
        that took Redis from the edges was under way while it was asked (it answered without
        reading Redis; a full Redis is read as ever), or one that took Redis or kept their
        writes from it while the first was (its click, and what it remembers, spooled) had
        not healed long enough before ``again`` for the spool to bring them to Redis; which,
        or None."""
        for f in self.h.faults:
            # a replay that met a full Redis (its note says so) filled it: Redis refused writes
            full = f.kind == "redis-full" or "OutOfMemoryError" in f.note
            if not (f.kind in REDIS_AWAY or full or (f.kind == "partition" and f.target.startswith("edge-redis"))):
                continue
            healed = f.healed if f.healed is not None else 1e9
            unread = not full and f.started <= again.at + (again.took or 0.0)
            if unread and healed + PROBE_S >= again.at:
                return "asked without Redis"
            during_first = f.started <= first.at + (first.took or 0.0) and healed + PROBE_S >= first.at
            if during_first and again.at <= healed + SPOOL_DRAIN_S:
                return "first spooled"
        return None

    def _forgotten(self, op: Op, a: Any) -> None:
        """A lead with an empty ``clickId`` after its customer's deferred lead was answered 2xx
        goes on the deferred lead's click: a 400 ("no click") forgot it (``deferred_forgotten``),
        unless its deferred lead was never answered 2xx. A failover is no excuse: an answer
        2xx is durable at ``REFSTREAM_ACK_DURABILITY``'s level, and the edge remembers the
        click in Redis alone (open: seed 1092658661, where Sentinel promoted a server that
        had not replicated it)."""
        deferred = self.h.op(op.echo["deferred"])
        if deferred is not None and any(d.outcome == "ok" for d in deferred.attempts):
            why = f"a 400 after its deferred lead (op {op.echo['deferred']}) was answered 2xx"
            self._say("deferred_forgotten", op, why)

    def _attributed(self) -> None:
        """A direct sale of a new customer is attributed to the click it named: the lead it
        made from that click is the customer's only one (``unattributed`` otherwise)."""
        for op in self.h.ops.values():
            code = op.echo.get("attributed") if op.kind == "dub-sale" and op.skipped is None else None
            if code is None:
                continue
            for r in self.by_token.get(op.units[0].token, []):
                if r["code"] != code:
                    why = f"direct sale {r['event_id']} on {r['code']!r}, not its click's {code!r}"
                    self._say("unattributed", op, why)

    def _surely_suppressed(self, op: Op, listing_n: int, value: str = "") -> bool | None:
        """None: the visitor was never listed (every listing refused); False: it may have
        been when the click was sent; True: every attempt was sent after the listing's 2xx
        plus the edges' refresh period, with no fault in between that could keep an edge
        from reading the list (an edge killed, frozen or restarted with a clock offset
        reads it again first; Postgres away, slowed for the edges or cut off from them)."""
        listing = self.h.op(listing_n)
        if listing is None:
            return None
        tries = listing.attempts
        if listing.kind == "suppress-bulk":  # the POSTs of ``value``, one of many (``cases.py``)
            i = next((i for i, e in enumerate(listing.body) if e["value"] == value), None)
            tries = [listing.attempts[j] for j in listing.echo.get("by_value", {}).get(i, [])]
        if not any(a.outcome in ("ok", "unknown") for a in tries):
            return None
        oks = [a for a in tries if a.outcome == "ok"]
        if not oks or not op.attempts:
            return False
        listed_at = oks[0].at + (oks[0].took or 0.0)
        first = min(a.at for a in op.attempts)
        if first < listed_at + SUPPRESSION_REFRESH_S + REFRESH_SLACK_S:
            return False
        for f in self.h.faults:
            healed = f.healed if f.healed is not None else 1e9
            if f.started > first or healed < listed_at - REFRESH_SLACK_S:
                continue
            edge_process = f.kind in ("process-kill", "process-stop", "clock-skew") and f.target.startswith("edge")
            edge_pg = f.kind in ("partition", "pg-slow") and "edge-pg" in f.target  # a read that takes longer
            # a shard down, or a workspace fenced for its move: a list there is not read meanwhile
            shard = f.kind in ("shard-outage", "workspace-move")
            if edge_process or f.kind == "pg-kill" or edge_pg or shard:
                return False
        return True

    async def _bursts(self) -> None:
        """Every stored click is judged: the rule runs after its batch's commit
        (``workers.consumer.burst_pass``), and what a pass has yet to judge is gone from
        ``burst_pending`` within the workers' passes after the drain (awaited, not slept).
        Every ``click_burst`` flag is earned: its click's window (the link, the address,
        ``window_seconds`` up to it, in (time, event id) order, test mode aside) holds more
        stored clicks than ``threshold_clicks``, and its evidence's ``clicks`` is where the
        count stops, the threshold + 1. A click erased since (its address scrubbed) may
        have been counted: the window's clicks without an address count towards it; a
        flagged click erased itself, whose address is gone, is not judged. (A click the
        definition names need not be flagged: stored out of order, a count may fall short.)"""
        deadline = time.monotonic() + UNJUDGED_WAIT_S
        while True:  # polled: the passes are in the workers' processes
            left = await self.check.fetchval("SELECT count(*) FROM burst_pending")
            if not left or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.25)
        if left:
            self.a.add("burst_unjudged", f"{left} batches' clicks not judged {UNJUDGED_WAIT_S:.0f}s after the drain")
        flags = await self.check.fetch(BURSTS)
        self.bursts = len(flags)
        for event_id, n in Counter(r["event_id"] for r in flags).items():
            if n > 1:  # a click judged twice (a pass repeated, a replay) flags nothing twice
                self.a.add("burst_twice", f"click_burst flags of {event_id}: {n}")
        for r in flags:
            flag = f"click_burst flag of {r['event_id']} ({r['token']})"
            threshold = f"threshold {r['threshold']}"
            if r["clicks"] != r["threshold"] + 1:
                self.a.add("burst_evidence", f"{flag}: evidence clicks {r['clicks']}, {threshold}")
            if r["in_window"] <= r["threshold"]:
                self.a.add("burst_unearned", f"{flag}: {r['in_window']} clicks in its window, {threshold}")

    async def _generated(self) -> None:
        """A management write: once if answered 2xx (the code it answered), never if refused."""
        made = {
            "generate": {r["token"]: r for r in await self.check.fetch(GENERATED)},
            "link": {r["token"]: r for r in await self.check.fetch(CREATED)},
        }
        for op in self.h.ops.values():
            if op.kind not in made:
                continue
            codes = {a.body.get("code") for a in op.attempts if a.outcome == "ok" and isinstance(a.body, dict)}
            row = made[op.kind].get(op.token)
            if codes and (row is None or row["links"] != 1 or {row["code"]} != codes):
                self._say("foreign_answer" if row else "lost", op, f"answered {codes}, stored {dict(row or {})}")
            elif not codes and row is not None and not any(a.outcome == "unknown" for a in op.attempts):
                self._say("refused_write_kept", op, f"refused, yet stored {dict(row)}")

    async def _archive(self, stored: set[str], never_accepted: set[str]) -> None:
        store = LocalStore(str(self.archive_root))
        lines: Counter[tuple[int, str]] = Counter()
        events = self.copies
        for key in await store.list(self.prefix + "/"):
            manifest, entries = seg.read(await store.get(key))
            for e in entries:
                lines[(manifest.partition, e.id)] += 1
                try:
                    events[
                        wire.from_entry(e.fields if e.fields is not None else {FIELD: e.envelope or b""}).event_id.hex
                    ] += 1
                except EnvelopeError:
                    self.a.add("archive_missing", f"an archived line that is no envelope: {manifest.partition} {e.id}")
        self.archived_lines = sum(lines.values())
        for (p, sid), n in lines.items():
            if n > 1:
                self.a.add("archive_twice", f"partition {p} entry {sid} in {n} segment lines")
        failed_over = any(f.kind == "sentinel-failover" for f in self.h.faults)
        for event in sorted(stored - set(events)):
            if failed_over and event in never_accepted:
                self.lost_with_redis.append(event)
                continue
            self.a.add("archive_missing", f"stored event {event} is in no archive segment")

    def _replays(self) -> None:
        for f in self.h.faults:
            if f.kind != "replay" or f.note.startswith("exit 0"):
                continue
            healed = f.healed if f.healed is not None else 1e9
            outages = [
                g.line()
                for g in self.h.faults
                if g.kind.startswith(OUTAGES) and g.started <= healed and (g.healed or 1e9) >= f.started
            ]
            if not outages:
                self.a.add("replay_failed", f"{f.line()} with no outage under way")


def _norm(value: Any) -> Any:
    return value.hex if hasattr(value, "hex") and not isinstance(value, str | bytes) else value


def _named(op: Op, a: Any, i: int) -> str | None:
    return named_events(op, a).get(i)
