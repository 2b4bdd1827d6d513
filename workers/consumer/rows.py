"""A batch's events as ``events`` rows (``workers.consumer.event_row``), built in memory
before the batch's transaction writes anything of them: each event's link resolved (an
unknown or inactive one is a drop with no row), its visitor enriched (``enrich``), its
devices, places and User-Agent by their ids (``devices``), in event-id order.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from ingest.contract import clicks
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.links import LinkInfo
from workers.consumer import devices, drops, event_row
from workers.consumer.dedupe import dedupe_key
from workers.consumer.enrich import Enricher, Found
from workers.consumer.event_row import EventRow
from workers.consumer.stored import Stored, ts

VISITOR_DIALECTS = frozenset({Dialect.BIORE, Dialect.AFFITOR, Dialect.REDIRECT, Dialect.DUB})


def _inet(ip: str | None) -> str | None:
    # the edge sends what the socket said; anything else is not stored rather than failing
    if ip is None:
        return None
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return None


def _opt(v: object) -> str | None:
    return v if isinstance(v, str) else None


BROWSER_KEYS = 65_536  # (address, User-Agent) pairs whose visitor key this process remembers
_browser_keys: dict[tuple[str | None, str | None], str] = {}


def _visitor_key(e: Envelope) -> str | None:
    if visitor := _opt(e.payload.get("visitor_id")):
        return visitor
    if e.ip or e.user_agent:  # seed 000 sends no visitor: the browser is what we have
        pair = (e.ip, e.user_agent)
        key = _browser_keys.get(pair)
        if key is None:  # a browser clicks again and again: its digest taken once (memory only)
            if len(_browser_keys) >= BROWSER_KEYS:
                _browser_keys.clear()
            key = _browser_keys[pair] = "h:" + hashlib.sha256(f"{e.ip}|{e.user_agent}".encode()).hexdigest()[:24]
        return key
    return None


def _out_of_window(e: Envelope, link: LinkInfo) -> bool:
    """A lead or conversion whose click (its click id carries the click's UUIDv7 time) is
    older than the program's cookie window."""
    if e.type is EventType.CLICK:
        return False
    click = clicks.parse(c) if isinstance(c := e.payload.get("click_id"), str) else None
    if click is None:
        return False  # no click to measure from (a Bricqs conversion by code)
    clicked_ms = click.int >> 80
    return e.received_at_ms - clicked_ms > link.cookie_window_days * 86_400_000


def named(envelopes: list[Envelope]) -> tuple[list[tuple[str | None, str | None]], set[str]]:
    """What ``devices.ids`` makes the entries of: the (User-Agent, address) of each enriched
    click, and every User-Agent's text."""
    return [(e.user_agent, e.ip) for e in envelopes if _enriched(e)], {e.user_agent for e in envelopes if e.user_agent}


def _enriched(e: Envelope) -> bool:
    """A click from a browser: a batch click carries its visitor's IP and User-Agent when the
    forwarding server knew them."""
    visitor = e.dialect in VISITOR_DIALECTS or (e.dialect == Dialect.NATIVE and e.user_agent is not None)
    return visitor and e.type is EventType.CLICK


def _enrich(e: Envelope, enricher: Enricher | None, policy: str) -> tuple[str | None, Found | None]:
    """(ip to store, enrichment). Only browser-facing dialects carry the visitor's IP and
    User-Agent; a server-to-server call's are its server's, not worth a geo or bot verdict."""
    if enricher is None:
        return _inet(e.ip) if policy == "full" else None, None
    if _enriched(e):
        found = enricher.enrich_row(e.ip, e.user_agent, _opt(e.payload.get("referrer")), policy)
        return found.ip, found
    return enricher.stored_ip(e.ip, policy), None


@dataclass(slots=True)
class Built:
    """A batch's rows (in event-id order), the events they store (by event id), and the
    events dropped with no event row (counted once by event id)."""

    rows: list[EventRow] = field(default_factory=list)
    kept: dict[UUID, Stored] = field(default_factory=dict)
    no_row: list[drops.NoRow] = field(default_factory=list)
    unknown_codes: list[str] = field(default_factory=list)
    inactive_codes: list[str] = field(default_factory=list)


def build(
    envelopes: list[Envelope],
    by_code: dict[str, LinkInfo],
    policies: dict[str, Any],
    enricher: Enricher | None,
    known: devices.Known,
    counting: set[str],
) -> Built:
    """The rows of ``envelopes`` (the batch's events, sales aside), of the links ``by_code``
    and their workspaces' ``policies``; ``counting``: the workspaces whose bots' clicks count."""
    out = Built()
    for e in sorted(envelopes, key=lambda e: e.event_id.int):  # UUID order; ints compare in C, UUIDs in Python
        code = e.payload.get("code")
        link = by_code.get(code) if isinstance(code, str) else None
        if link is None or (e.workspace_id is not None and e.workspace_id != link.workspace_id):
            out.unknown_codes.append(str(code))
            out.no_row.append(drops.NoRow(e.event_id, e.workspace_id, None, "unknown_code", ts(e.received_at_ms)))
            continue
        if e.type is EventType.CLICK and not link.active:
            out.inactive_codes.append(link.code)
            out.no_row.append(
                drops.NoRow(e.event_id, link.workspace_id, link.id, "inactive_link", ts(e.received_at_ms))
            )
            continue
        ws = policies.get(link.workspace_id)
        ip, found = _enrich(e, enricher, ws["ip_policy"] if ws else "full")
        row = _row(e, link, ip, found, known, link.workspace_id in counting)
        out.rows.append(row)
        out.kept[e.event_id] = Stored(
            e,
            link,
            row.received_at,
            row.is_bot,
            row.visitor_key,
            row.out_of_window,
            ip,
            found.bot_reason if found else None,
        )
    return out


def _row(
    e: Envelope, link: LinkInfo, ip: str | None, found: Found | None, known: devices.Known, count_bots: bool
) -> EventRow:
    """One event's row; ``count_bots``: its workspace's bot_policy is ``count``."""
    is_bot = found is not None and found.is_bot
    click_id = clicks.parse(c) if isinstance(c := e.payload.get("click_id"), str) else None
    visitor = _opt(e.payload.get("visitor_id"))
    p = e.payload
    referrer = _opt(p.get("referrer"))
    # positional, in the columns' order (each named after it): a call by keyword of
    # EventRow's 28 fields took 1.5 µs more a row than this
    return EventRow(
        e.event_id,  # event_id
        int(e.type),  # type
        link.workspace_id,  # workspace_id
        link.id,  # link_id
        link.program_id,  # program_id
        link.affiliate_id,  # affiliate_id
        click_id,  # click_id
        visitor,  # visitor_id
        _opt(p.get("external_id")),  # customer_external_id
        _opt(p.get("name")),  # name
        dedupe_key(e),  # dedupe_key
        e.dialect,  # dialect
        p.get("test_mode") is True,  # test_mode
        is_bot,  # is_bot
        ts(e.received_at_ms),  # received_at
        ip,  # ip
        None,  # user_agent: by its id (schema 20)
        referrer,  # referrer
        found.country if found else None,  # country
        found.asn if found else None,  # asn
        # enrichment
        event_row.row_fields(found.bot_reason, found.referrer_domain, found.ip, referrer) if found else None,
        _visitor_key(e),  # visitor_key
        _out_of_window(e, link),  # out_of_window
        # payload: a click's without its ids (a lead's or conversion's the erasure's scrub
        # of its row reads: a conversion's dedupe key holds its visitor id)
        event_row.row_payload(p, link.code, click=click_id, visitor=visitor)
        if e.type is EventType.CLICK
        else event_row.row_payload(p, link.code),
        is_bot and count_bots,  # bot_counted
        known.devices[found.device] if found else None,  # device_id
        known.places[found.place] if found and found.place.count(None) < len(found.place) else None,  # place_id
        known.agents[e.user_agent] if e.user_agent else None,  # agent_id
    )
