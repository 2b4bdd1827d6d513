"""Realistic requests for each measured route: browser User-Agents and referrers, client
addresses through ``X-Forwarded-For`` (the edge sits behind a trusted proxy, so rate-limit
keys and geo lookups vary as they would in production), the seeds' example bodies, keys.
"""

from __future__ import annotations

from typing import Any

from .world import BROWSER, UAS, World, client_ip, dumps
from .wrk import Request

VARIANTS = 256
BATCH_EVENTS = 500


def _headers(i: int, key: str | None = None) -> dict[str, str]:
    h = {
        "Content-Type": "application/json",
        "User-Agent": UAS[i % 3],  # browsers only: bots are the worker's business
        "X-Forwarded-For": client_ip(i),
        "Referer": "https://bio.re/alex",
    }
    if key:
        h["Authorization"] = f"Bearer {key}"
    return h


def seed_000(world: World) -> list[Request]:
    return [
        Request(f"/api/v1/referral/click/{world.codes[i % len(world.codes)]}", "", _headers(i)) for i in range(VARIANTS)
    ]


def seed_002(world: World) -> list[Request]:
    out = []
    for i in range(VARIANTS):
        body = {
            "affiliate_url": f"https://yoursite.com/pricing?aff={world.codes[i % len(world.codes)]}",
            "page_url": "https://yoursite.com/pricing",
            "page_title": "Pricing — YourSite",
            "referrer_url": "https://blog.example.com/post",
            "session_id": f"sess_{i:06d}",
            "screen_resolution": "1920x1080",
            "viewport_size": "1280x800",
            "language": "en-US",
            "timezone": "America/New_York",
        }
        out.append(Request("/api/v1/track/click", dumps(body), _headers(i)))
    return out


def _affixo(world: World, i: int) -> dict[str, Any]:
    return {
        "ref": world.codes[i % len(world.codes)],
        "visitor_id": f"v_{i:08d}",
        "fingerprint": f"fp-{i:08x}-canvas-webgl-fonts",
        "url": "https://yoursite.com/pricing?ref=jane",
        "referrer": "https://blog.example.com/post",
    }


def seed_003(world: World) -> list[Request]:
    return [Request("/v1/track/click", dumps(_affixo(world, i)), _headers(i, world.api_key)) for i in range(VARIANTS)]


def seed_004(world: World) -> list[Request]:
    out = []
    for i in range(VARIANTS):
        body = {
            "clickId": world.click_ids[i % len(world.click_ids)],
            "eventName": "Sign Up",
            "customerExternalId": f"user_{i:06d}",
            "customerEmail": f"user{i}@example.com",
            "customerName": "Alice",
            "customerAvatar": "https://example.com/avatar.png",
            "metadata": {"plan": "free"},
        }
        out.append(Request("/api/track/lead", dumps(body), _headers(i, world.api_key)))
    return out


def seed_004_sale(world: World) -> list[Request]:
    """Refport's sale, without an invoice (a distinct invoice per request is what a real
    shop sends; a replayed set of requests would measure its repeats' replay instead)."""
    out = []
    for i in range(VARIANTS):
        body = {
            "customerExternalId": f"user_{i:06d}",
            "amount": 4900 + i,
            "currency": "usd",
            "paymentProcessor": "stripe",
            "metadata": {"plan": "pro"},
        }
        out.append(Request("/api/track/sale", dumps(body), _headers(i, world.api_key)))
    return out


def batch(world: World, variants: int = 4) -> list[Request]:
    """``POST /v1/events/batch`` with 500 clicks each, as Affixo's route gets them one by one."""
    out = []
    for v in range(variants):
        items = []
        for j in range(BATCH_EVENTS):
            i = v * BATCH_EVENTS + j
            items.append({"type": "click", **_affixo(world, i), "ip": client_ip(i), "user_agent": BROWSER})
        out.append(Request("/v1/events/batch", dumps(items), _headers(v, world.api_key)))
    return out


ROUTES = {"b000": seed_000, "b002": seed_002, "b003": seed_003, "b004": seed_004, "b004sale": seed_004_sale}
