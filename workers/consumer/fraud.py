"""Fraud flags: rules over a batch's newly stored events, in its transaction; the
click_burst rule after its commit (``workers.consumer.burst_pass``), but where the
workspace excludes it.

A flag never deletes anything: it is stored on the event (``event_flags``: rule and
evidence, by event id; the event's link, affiliate and time are its row's; a click_burst
flag of schemas 18 to 22 the workspace did not exclude on the click's own row,
``burst_clicks`` and ``burst_seconds``), counted per link and day like the drops, and
announced (``fraud.flagged``).
Whether a flagged event still counts is the workspace's policy per rule
(``workspaces.fraud_policy``: ``flag``, the default, counts it; ``exclude`` moves no
counter, credits no affiliate and makes no customer for it). The decision is recorded on
the flag (``excluded``), so a recount reads what was decided.

Rules, thresholds per program (``programs.fraud_thresholds``, defaults below):

- ``self_referral``: a lead's customer email is its affiliate's, or shares its domain
  when that domain is not a public mail provider's;
- ``affiliate_ip``: a lead or conversion came from, or its click came from, an address
  the affiliate's own key was used from (``affiliate_ips``, kept by the affiliate API);
- ``click_burst``: more than ``burst_clicks`` clicks from one IP on one link within
  ``burst_seconds`` (the click that crosses the line, and each one after it, is flagged;
  its evidence's ``clicks`` is the count up to ``burst_clicks`` + 1, where counting stops;
  counted from the windows ``workers.consumer.bursts`` keeps per link and address; judged
  after the batch's commit, docs/guarantees.md says how soon);
- ``fast_conversion``: a conversion within ``fast_conversion_seconds`` of its click;
- ``disposable_email``: a lead's customer email is at a disposable-mail domain (the list
  shipped in ``workers/data``, see the README for its source).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from importlib import resources
from typing import Any
from uuid import UUID

import asyncpg
import structlog

from ingest.contract import clicks, jsonrows, plans
from ingest.contract.events import EventType
from ingest.contract.fraud import FRAUD_THRESHOLDS as DEFAULT_THRESHOLDS
from ingest.ledger.outbox import WebhookEvent
from workers.consumer import bursts
from workers.consumer.stored import Stored

log = structlog.get_logger("workers.fraud")

PUBLIC_MAIL = frozenset(
    "gmail.com googlemail.com yahoo.com yahoo.co.uk ymail.com outlook.com hotmail.com hotmail.co.uk live.com msn.com"
    " icloud.com me.com mac.com aol.com proton.me protonmail.com pm.me gmx.com gmx.de gmx.net web.de yandex.ru"
    " yandex.com mail.ru qq.com 163.com 126.com zoho.com fastmail.com hey.com tutanota.com orange.fr free.fr"
    " t-online.de libero.it naver.com".split()
)

# an affiliate's email, for self_referral (one plan, whatever the ids: ``ingest.contract.plans``)
_EMAILS = f"SELECT id, email FROM affiliates WHERE id = {plans.any_of(1, 'uuid')}"
# a flag holds what its event's row does not (schema 17): its link, affiliate, type and time
# are the row's, read through it by event id
_FLAGS = f"""
INSERT INTO event_flags (event_id, rule, workspace_id, excluded, evidence)
{jsonrows.select(("uuid", "text", "uuid", "boolean", "jsonb"))}
ORDER BY 1, 2
ON CONFLICT DO NOTHING
"""


@cache
def disposable_domains() -> frozenset[str]:
    text = resources.files("workers").joinpath("data/disposable_email_domains.txt").read_text()
    return frozenset(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def is_disposable(domain: str) -> bool:
    parts = domain.split(".")
    listed = disposable_domains()
    return any(".".join(parts[i:]) in listed for i in range(len(parts) - 1))


@dataclass(frozen=True, slots=True)
class Flag:
    stored: Stored
    rule: str
    evidence: dict[str, Any]  # numbers the rules computed, never a client's document: a level deep
    excluded: bool


# of a rule's evidence, what its event's row holds already and the stored flag leaves out
# (the notice keeps it): the clicking address, the row's ``ip``, which an erasure scrubs there
ON_THE_ROW = {"click_burst": ("ip",)}


def stored_evidence(flag: Flag) -> dict[str, Any]:
    """The evidence as ``event_flags`` keeps it: without what ``ON_THE_ROW`` names."""
    drop = ON_THE_ROW.get(flag.rule)
    return {k: v for k, v in flag.evidence.items() if k not in drop} if drop else flag.evidence


@dataclass(slots=True)
class Found:
    flags: list[Flag] = field(default_factory=list)
    excluded: set[UUID] = field(default_factory=set)

    def counted(self, events: list[Stored]) -> list[Stored]:
        return [s for s in events if s.envelope.event_id not in self.excluded]


def _email(s: Stored) -> str | None:
    v = s.text("email")
    return v.strip().lower() if v and "@" in v else None


def _click_ms(s: Stored) -> int | None:
    for key in ("click_id", "visitor_id"):
        if (v := s.text(key)) and (c := clicks.parse(v)) is not None:
            return int(c.int >> 80)
    return None


def _thresholds(program: str, raw: object) -> dict[str, int]:
    """A program's thresholds, the default for each one missing or unusable: the API
    refuses a bad value, but one written by hand must not fail every batch of the program."""
    given = raw if isinstance(raw, dict) else {}
    out = {}
    for name, default in DEFAULT_THRESHOLDS.items():
        value = given.get(name, default)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            out[name] = value
        else:
            out[name] = default
            log.warning("fraud.bad_threshold", program_id=program, threshold=name, value=repr(value)[:100])
    return out


def thresholds_of(program_thresholds: dict[str, object]) -> dict[str, dict[str, int]]:
    """Per program id, its thresholds (``fraud_thresholds`` as stored, read with the batch's
    links in its transaction), each unusable one its default."""
    return {program: _thresholds(program, raw) for program, raw in program_thresholds.items()}


def _limits(thresholds: dict[str, dict[str, int]], s: Stored) -> dict[str, int]:
    return thresholds.get(s.link.program_id or "", DEFAULT_THRESHOLDS)


def burst_excluded(fraud_policy: dict[str, dict[str, str]], workspace_id: str) -> bool:
    """Whether a workspace excludes click_burst: its clicks are then judged in their batch's
    transaction, since the flag decides what they count; every other click after the
    commit (``workers.consumer.burst_pass``), the flag being a flag and no more."""
    return fraud_policy.get(workspace_id, {}).get("click_burst") == "exclude"


def burst_limits(thresholds: dict[str, int]) -> bursts.Limits:
    return bursts.Limits(thresholds["burst_clicks"], thresholds["burst_seconds"])


async def bursts_before_insert(
    conn: asyncpg.Connection, clicks: list[Stored], thresholds: dict[str, dict[str, int]]
) -> dict[UUID, bursts.Counted]:
    """The click_burst rule over the clicks of workspaces that exclude it, run before the
    batch's events are inserted: the clicks flagged among ``clicks`` (the batch's, test
    mode aside), by event id. Every click with an address joins its window, a bot's too; a
    redelivered copy of one stored before changes no window (``workers.consumer.bursts``),
    and is no event ``detect`` flags (it inserted nothing)."""
    windowed = [
        bursts.Click(s.envelope.event_id, s.link.id, s.ip, s.envelope.received_at_ms, not s.is_bot)
        for s in clicks
        if s.type is EventType.CLICK and s.ip
    ]
    if not windowed:
        return {}
    limits_of = {s.link.id: burst_limits(_limits(thresholds, s)) for s in clicks}
    counted = await bursts.count(conn, windowed, limits_of)
    return {c.click.event_id: c for c in counted if c.clicks > c.limits.clicks}


async def detect(
    conn: asyncpg.Connection,
    events: list[Stored],
    fraud_policy: dict[str, dict[str, str]],
    thresholds: dict[str, dict[str, int]],
    burst: dict[UUID, bursts.Counted],
) -> Found:
    """Flag ``events`` (newly inserted, live), store the flags; what to leave uncounted.
    ``fraud_policy``: per workspace id, rule -> ``flag`` | ``exclude``; ``thresholds``:
    ``thresholds_of``'s; ``burst``: ``bursts_before_insert``'s flags."""
    found = Found()
    if not events:
        return found
    raw: list[tuple[Stored, str, dict[str, Any]]] = []
    people = [s for s in events if s.type is not EventType.CLICK]
    fast = [(s, ms) for s in events if s.type is EventType.CONVERSION and (ms := _click_ms(s)) is not None]

    for s, ms in fast:
        seconds = (s.envelope.received_at_ms - ms) / 1000
        if 0 <= seconds < _limits(thresholds, s)["fast_conversion_seconds"]:
            evidence = {
                "seconds_after_click": round(seconds, 3),
                "threshold_seconds": _limits(thresholds, s)["fast_conversion_seconds"],
            }
            raw.append((s, "fast_conversion", evidence))

    for s in events:
        if (c := burst.get(s.envelope.event_id)) is not None:
            crossed: dict[str, Any] = {
                "ip": s.ip,
                "clicks": c.clicks,
                "threshold_clicks": c.limits.clicks,
                "window_seconds": c.limits.seconds,
            }
            raw.append((s, "click_burst", crossed))

    if people:
        raw += await _people(conn, people)

    for s, rule, evidence in raw:
        excluded = fraud_policy.get(s.link.workspace_id, {}).get(rule) == "exclude"
        found.flags.append(Flag(s, rule, evidence, excluded))
        if excluded:
            found.excluded.add(s.envelope.event_id)
    stored = sorted(found.flags, key=lambda f: (f.stored.envelope.event_id, f.rule))
    if stored:
        await conn.execute(
            _FLAGS,
            jsonrows.doc(
                [
                    (x.stored.envelope.event_id, x.rule, x.stored.link.workspace_id, x.excluded, stored_evidence(x))
                    for x in stored
                ]
            ),
        )
    return found


async def _people(conn: asyncpg.Connection, people: list[Stored]) -> list[tuple[Stored, str, dict[str, Any]]]:
    """self_referral, affiliate_ip and disposable_email over leads and conversions."""
    out: list[tuple[Stored, str, dict[str, Any]]] = []
    affiliates = sorted({s.link.affiliate_id for s in people if s.link.affiliate_id})
    emails: dict[str, str] = {}
    ips: dict[str, set[str]] = {}
    click_ips: dict[UUID, str] = {}
    if affiliates:
        for r in await conn.fetch(_EMAILS, affiliates):
            if r["email"] and "@" in r["email"]:
                emails[str(r["id"])] = r["email"].strip().lower()
        for r in await conn.fetch(
            "SELECT affiliate_id, host(ip) AS ip FROM affiliate_ips WHERE affiliate_id = ANY($1::uuid[])", affiliates
        ):
            ips.setdefault(str(r["affiliate_id"]), set()).add(r["ip"])
        wanted = sorted({c for s in people if s.link.affiliate_id in ips and (c := _click_of(s)) is not None})
        if wanted:
            rows = await conn.fetch(
                "SELECT event_id, host(ip) AS ip FROM events WHERE event_id = ANY($1::uuid[]) AND type = 1"
                " AND ip IS NOT NULL",
                wanted,
            )
            click_ips = {r["event_id"]: r["ip"] for r in rows}
    for s in people:
        email = _email(s)
        aff = s.link.affiliate_id
        if email is not None:
            domain = email.rsplit("@", 1)[1]
            if is_disposable(domain):
                out.append((s, "disposable_email", {"email": email, "domain": domain}))
            mine = emails.get(aff or "")
            if mine is not None:
                if email == mine:
                    out.append((s, "self_referral", {"email": email, "affiliate_email": mine, "match": "email"}))
                elif domain == mine.rsplit("@", 1)[1] and domain not in PUBLIC_MAIL and not is_disposable(domain):
                    out.append((s, "self_referral", {"email": email, "affiliate_email": mine, "match": "domain"}))
        known = ips.get(aff or "")
        if known:
            seen = {"event": s.ip, "click": click_ips.get(_click_of(s) or UUID(int=0))}
            hits = {k: v for k, v in seen.items() if v and v in known}
            if hits:
                out.append((s, "affiliate_ip", {"ip": next(iter(hits.values())), "from": sorted(hits)}))
    return out


def _click_of(s: Stored) -> UUID | None:
    v = s.text("click_id")
    return clicks.parse(v) if v else None


def notices(found: Found, heard: Callable[[str], bool] = lambda workspace_id: True) -> list[WebhookEvent]:
    """``fraud.flagged``: one per flagged event, with every rule it met and the evidence;
    only for the workspaces ``heard`` says a webhook listens to."""
    by_event: dict[UUID, list[Flag]] = {}
    for f in found.flags:
        if heard(f.stored.link.workspace_id):
            by_event.setdefault(f.stored.envelope.event_id, []).append(f)
    out = []
    for event_id, flags in sorted(by_event.items()):
        s = flags[0].stored
        link = {
            "id": s.link.id,
            "code": s.link.code,
            "program_id": s.link.program_id,
            "affiliate_id": s.link.affiliate_id,
        }
        met = [(f.rule, f.evidence, f.excluded) for f in flags]
        out.append(notice(s.link.workspace_id, event_id, s.type.name.lower(), s.at, link, met))
    return out


def notice(
    workspace_id: str,
    event_id: UUID,
    type_name: str,
    at: datetime,
    link: dict[str, str | None],
    flags: list[tuple[str, dict[str, Any], bool]],
) -> WebhookEvent:
    """One event's ``fraud.flagged``: its ``flags`` as (rule, evidence, excluded)."""
    data = {
        "event_id": str(event_id),
        "type": type_name,
        "received_at": at.isoformat(),
        "link": link,
        "excluded": any(excluded for _, _, excluded in flags),
        "flags": [
            {"rule": rule, "evidence": evidence, "excluded": excluded}
            for rule, evidence, excluded in sorted(flags, key=lambda f: f[0])
        ],
    }
    return WebhookEvent(workspace_id, "fraud.flagged", event_id, "", data)
