"""Steady HTTP load with a unique marker on every request, and a record of what the edge
accepted (answered 2xx) and what it refused.

Each event type carries a marker the worker stores, so the checker can find every accepted
event in Postgres (``MARKER_SQL``):
- seed 000 clicks (bio.re): ``Referer: https://load.test/<uuid>`` → ``events.referrer``;
- seed 002 clicks (Affitor): the ``click_id`` answered is ``clk_`` + the event id;
- seed 004 leads (Refport, on an accepted Affitor click): ``customerExternalId`` →
  ``events.customer_external_id``;
- seed 001 conversions (Bricqs): the ``conversion_id`` answered is ``conv_`` + the event id.
The load is open loop: a request is started every 1/rate seconds whatever the edge does;
past ``concurrency`` requests in flight new ones are shed (counted, never sent).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Self

import aiohttp
import orjson

from .._world import BROWSER

GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
CHROME = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36"

# the marker of a stored event, as the load records it
MARKER_SQL = (
    "CASE e.dialect WHEN 'biore' THEN e.referrer WHEN 'refport' THEN e.customer_external_id"
    " ELSE replace(e.event_id::text, '-', '') END"
)

DEFAULT_MIX = {"biore": 0.7, "affitor": 0.1, "lead": 0.1, "convert": 0.1}


def referer_marker() -> str:
    return f"https://load.test/{uuid.uuid4().hex}"


@dataclass
class Record:
    """What the edge said: every 2xx with its marker; every other answer counted."""

    accepted: dict[str, str] = field(default_factory=dict)  # marker -> kind
    attempted: set[str] = field(default_factory=set)  # every marker sent, whatever the answer
    statuses: Counter[str] = field(default_factory=Counter)  # "kind status" or "kind error"
    shed: int = 0
    first_2xx_at: float | None = None
    answers: list[tuple[float, float, str, int]] = field(default_factory=list)  # (sent at, seconds, kind, status)
    answered_at: dict[str, float] = field(default_factory=dict)  # marker -> when its 2xx came (monotonic)

    def answer_times(self, since: float, until: float) -> list[float]:
        """Seconds to the answer of each request sent between ``since`` and ``until``."""
        return sorted(s for at, s, _, _ in self.answers if since <= at < until)

    def accept(self, kind: str, marker: str) -> None:
        self.accepted[marker] = kind
        self.answered_at[marker] = time.monotonic()
        if self.first_2xx_at is None:
            self.first_2xx_at = time.monotonic()

    def refused(self) -> int:
        return sum(n for k, n in self.statuses.items() if not k.endswith(" 200"))


class Load:
    """``async with Load(base, codes, rate=100) as load: ...``; ``load.record`` afterwards."""

    def __init__(
        self,
        base: str,
        codes: list[str],
        *,
        rate: float,
        api_key: str | None = None,
        mix: dict[str, float] | None = None,
        concurrency: int = 64,
        seed: int = 0,
    ) -> None:
        self.base = base
        self.codes = codes
        self.rate = rate
        self.api_key = api_key
        mix = dict(mix or DEFAULT_MIX)
        if api_key is None:
            mix.pop("lead", None)  # leads need a workspace key
        self.kinds, self.weights = list(mix), list(mix.values())
        self.sem = asyncio.Semaphore(concurrency)
        self.rng = random.Random(seed)
        self.record = Record()
        self._clicks: list[str] = []  # accepted Affitor click ids, each used by at most one lead
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=20), connector=aiohttp.TCPConnector(limit=0)
        )
        if self.rate > 0:  # rate 0: no steady load, only send() and burst()
            self._task = asyncio.create_task(self._run(), name="load")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> Record:
        """Stop starting requests; wait for the ones in flight (their answers count)."""
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None
        return self.record

    async def burst(self, n: int, *, kinds: dict[str, float] | None = None, concurrency: int = 32) -> None:
        """``n`` requests as fast as the edge answers them (closed loop), e.g. to build a backlog."""
        sem = asyncio.Semaphore(concurrency)
        mix = kinds or {"biore": 1.0}

        async def one() -> None:
            async with sem:
                await self._one(self.rng.choices(list(mix), list(mix.values()))[0])

        await asyncio.gather(*(one() for _ in range(n)))

    async def _run(self) -> None:
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        while not self._stop.is_set():
            if self.sem.locked():
                self.record.shed += 1
            else:
                kind = self.rng.choices(self.kinds, self.weights)[0]
                task = asyncio.create_task(self._guarded(kind))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)
                except TimeoutError:
                    pass
            else:
                next_at = time.monotonic()  # fell behind (a stalled loop): do not burst to catch up
                await asyncio.sleep(0)

    async def _guarded(self, kind: str) -> None:
        async with self.sem:
            await self._one(kind)

    async def send(self, kind: str, code: str | None = None) -> None:
        """One request of ``kind`` (on ``code``, else a random one of the load's codes)."""
        if self._http is None:
            raise RuntimeError("send() outside `async with Load(...)`")
        await self._one(kind, code)

    async def _one(self, kind: str, code: str | None = None) -> None:
        if kind == "lead" and not self._clicks:
            kind = "affitor"  # a lead needs an accepted click first
        code = code or self.rng.choice(self.codes)
        try:
            if kind == "biore":
                await self._biore(code)
            elif kind == "affitor":
                await self._affitor(code)
            elif kind == "lead":
                await self._lead()
            else:
                await self._convert(code)
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.record.statuses[f"{kind} {type(exc).__name__}"] += 1

    async def _post(self, kind: str, path: str, marker: str | None, **kw: Any) -> tuple[int, object]:
        assert self._http is not None
        if marker is not None:
            self.record.attempted.add(marker)
        sent = time.monotonic()
        async with self._http.post(self.base + path, **kw) as r:
            raw = await r.read()
            self.record.answers.append((sent, time.monotonic() - sent, kind, r.status))
            self.record.statuses[f"{kind} {r.status}"] += 1
            try:
                return r.status, orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                return r.status, None

    async def _biore(self, code: str) -> None:
        marker = referer_marker()
        ua = GOOGLEBOT if self.rng.random() < 0.1 else self.rng.choice((BROWSER, CHROME))
        status, _ = await self._post(
            "biore", f"/api/v1/referral/click/{code}", marker, headers={"Referer": marker, "User-Agent": ua}
        )
        if 200 <= status < 300:
            self.record.accept("biore", marker)

    async def _affitor(self, code: str) -> None:
        body = {"affiliate_url": f"https://shop.test/landing?aff={code}", "referrer_url": "https://news.test/a"}
        ua = self.rng.choice((BROWSER, CHROME))
        status, out = await self._post("affitor", "/api/v1/track/click", None, json=body, headers={"User-Agent": ua})
        if 200 <= status < 300 and isinstance(out, dict) and out.get("success") is True:
            click_id = str(out["click_id"])
            marker = click_id.removeprefix("clk_")
            self.record.attempted.add(marker)
            self.record.accept("affitor", marker)
            self._clicks.append(click_id)

    async def _lead(self) -> None:
        click_id = self._clicks.pop(self.rng.randrange(len(self._clicks)))
        marker = f"lead-{uuid.uuid4().hex}"
        body = {"clickId": click_id, "eventName": "Sign Up", "customerExternalId": marker}
        status, _ = await self._post(
            "lead", "/api/track/lead", marker, json=body, headers={"Authorization": f"Bearer {self.api_key}"}
        )
        if 200 <= status < 300:
            self.record.accept("lead", marker)

    async def _convert(self, code: str) -> None:
        body = {"code": code, "referred_session_id": f"sess-{uuid.uuid4().hex}"}
        status, out = await self._post("convert", "/api/v1/referrals/convert", None, json=body)
        if 200 <= status < 300 and isinstance(out, dict) and isinstance(out.get("conversion_id"), str):
            marker = out["conversion_id"].removeprefix("conv_")
            self.record.attempted.add(marker)
            self.record.accept("convert", marker)
