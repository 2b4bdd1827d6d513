"""Load on every event route where each answer is checked against its own request
(docs/guarantees.md): an answer built from another request's Redis replies shows as a wrong echo.

What each kind sends, what its answer must echo, and its marker (``_load.MARKER_SQL``):
- ``biore`` (seed 000): the documented constant body; marker the ``Referer``.
- ``affitor`` (seed 002): ``success: true`` and ``partner_code`` = the ``aff`` it sent; a
  ``click_id`` no other answer carries; marker the click id.
- ``lead`` (seed 004, on an accepted Affitor click): ``click.id``, ``link.key`` and
  ``customer.externalId`` its own; marker the external id.
- ``convert`` (seed 001): ``converted`` and a ``conversion_id`` no other answer carries;
  marker the conversion id.
- ``affixo`` (seed 003): ``visitor_id`` = the one it sent, ``match_method: cookie``; stored
  with that ``visitor_id`` (``affixo``, checked apart: ``MARKER_SQL`` reads the event id).
- ``batch`` (``/v1/events/batch``): a click, a conversion and (given a click) a lead; one
  result per item, in order, the click's ``visitor_id`` its own, each ``event_id`` new;
  marker the event id. An item may fail as ``unavailable`` or ``outcome_unknown``.
- ``redirect`` (``GET /r/{code}``): a 302 to its own link's URL carrying a click id no
  other answer carries; marker the click id. A 302 without one is the route's refusal.
- ``sale`` (Refport's ``/api/track/sale``) and ``conversion`` (Affixo's
  ``/v1/track/conversion``), each with an invoice of its own: the customer, amount and
  invoice echoed; checked apart (``sales_stored_once``): every invoice answered 2xx in
  ``sales`` once, none answered only a refusal (a 503 not marked "may be stored").
Every request is valid and rate limits are off: any 4xx is a wrong answer, and so is any 5xx
but a 503. ``code_of`` keeps the link each accepted event names (its marker, an Affixo
visitor id): stored on another link, it was resolved from another request's reply.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import orjson

from .._world import BROWSER
from ._checks import Checker
from ._load import CHROME, MARKER_SQL, Load, referer_marker

MIX = {
    "biore": 0.2,
    "affitor": 0.15,
    "lead": 0.1,
    "convert": 0.1,
    "affixo": 0.1,
    "batch": 0.1,
    "redirect": 0.1,
    "sale": 0.1,
    "conversion": 0.05,
}
MAY_BE_STORED = ("Refstream-Outcome", "unknown")
TRACKED = {"success": True, "data": {"tracked": True}}
ITEM_FAILURES = ("unavailable", "outcome_unknown")  # a batch item's answers to an outage


class EchoLoad(Load):
    """``Load`` on all six event routes; ``problems()`` after ``stop()``."""

    def __init__(self, base: str, codes: list[str], *, rate: float, api_key: str, **kw: Any) -> None:
        super().__init__(base, codes, rate=rate, api_key=api_key, mix=MIX, **kw)
        self.wrong: list[str] = []  # answers that are not their request's
        self.minted: Counter[str] = Counter()  # ids the edge minted, over every answer
        self.affixo: set[str] = set()  # visitor ids of accepted Affixo clicks
        self.code_of: dict[str, str] = {}  # marker (or Affixo visitor id) -> the code its request named
        self._pairs: list[tuple[str, str]] = []  # accepted Affitor clicks: (click id, code)
        self.sales: set[str] = set()  # invoices of the sales answered 2xx
        self.sales_refused: set[str] = set()  # invoices answered only a refusal

    def problems(self) -> list[str]:
        out = [f"wrong answer: {w}" for w in self.wrong[:20]]
        if len(self.wrong) > 20:
            out.append(f"... and {len(self.wrong) - 20} more wrong answers")
        twice = [i for i, n in self.minted.items() if n > 1]
        if twice:
            out.append(f"{len(twice)} minted ids in more than one answer, e.g. {twice[:3]}")
        for key, n in sorted(self.record.statuses.items()):
            status = key.split()[1]
            if status.isdigit() and (status.startswith("4") or (status.startswith("5") and status != "503")):
                out.append(f"{n} answered {key} (every request is valid; a 5xx other than 503 is a bug)")
            elif not status.isdigit():
                out.append(f"{n} requests got no answer: {key}")
        return out

    def _expect(self, ok: bool, kind: str, sent: object, got: object) -> None:
        if not ok:
            self.wrong.append(f"{kind}: sent {sent!r}, answered {got!r}"[:400])

    def _mint(self, ident: str) -> None:
        self.minted[ident] += 1

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    async def _one(self, kind: str, code: str | None = None) -> None:
        if kind == "lead" and not self._pairs:
            kind = "affitor"
        code = code or self.rng.choice(self.codes)
        try:
            await getattr(self, f"_echo_{kind}")(code)
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.record.statuses[f"{kind} {type(exc).__name__}"] += 1

    async def _echo_biore(self, code: str) -> None:
        marker = referer_marker()
        headers = {"Referer": marker, "User-Agent": self.rng.choice((BROWSER, CHROME))}
        status, out = await self._post("biore", f"/api/v1/referral/click/{code}", marker, headers=headers)
        if status == 200:
            self._expect(out == TRACKED, "biore", code, out)
            self.record.accept("biore", marker)
            self.code_of[marker] = code

    async def _echo_affitor(self, code: str) -> None:
        body = {"affiliate_url": f"https://shop.test/landing?aff={code}", "referrer_url": "https://news.test/a"}
        status, out = await self._post(
            "affitor", "/api/v1/track/click", None, json=body, headers={"User-Agent": CHROME}
        )
        if status != 200:
            return
        if not (isinstance(out, dict) and out.get("success") is True and isinstance(out.get("click_id"), str)):
            self._expect(False, "affitor", code, out)  # every link of the load is active
            return
        click_id = out["click_id"]
        self._expect(out.get("partner_code") == code, "affitor", code, out)
        self._mint(click_id)
        marker = click_id.removeprefix("clk_")
        self.record.attempted.add(marker)
        self.record.accept("affitor", marker)
        self.code_of[marker] = code
        self._pairs.append((click_id, code))

    async def _echo_lead(self, _code: str) -> None:
        click_id, code = self._pairs.pop(self.rng.randrange(len(self._pairs)))
        marker = f"lead-{uuid.uuid4().hex}"
        body = {"clickId": click_id, "eventName": "Sign Up", "customerExternalId": marker}
        status, out = await self._post("lead", "/api/track/lead", marker, json=body, headers=self._auth())
        if status == 200:
            ok = isinstance(out, dict) and (
                out.get("eventName") == "Sign Up"
                and (out.get("click") or {}).get("id") == click_id
                and (out.get("link") or {}).get("key") == code
                and (out.get("customer") or {}).get("externalId") == marker
            )
            self._expect(ok, "lead", body, out)
            self.record.accept("lead", marker)
            self.code_of[marker] = code

    async def _echo_convert(self, code: str) -> None:
        body = {"code": code, "referred_session_id": f"sess-{uuid.uuid4().hex}"}
        status, out = await self._post("convert", "/api/v1/referrals/convert", None, json=body)
        if status != 200:
            return
        cid = out.get("conversion_id") if isinstance(out, dict) else None
        if not (isinstance(out, dict) and out.get("converted") is True and isinstance(cid, str)):
            self._expect(False, "convert", body, out)
            return
        self._expect(cid.startswith("conv_"), "convert", body, out)
        self._mint(cid)
        marker = cid.removeprefix("conv_")
        self.record.attempted.add(marker)
        self.record.accept("convert", marker)
        self.code_of[marker] = code

    async def _echo_affixo(self, code: str) -> None:
        visitor = f"vx-{uuid.uuid4().hex}"
        body = {"ref": code, "visitor_id": visitor, "url": f"https://shop.test/{code}"}
        status, out = await self._post("affixo", "/v1/track/click", None, json=body, headers=self._auth())
        if status == 200:
            want = {"ok": True, "visitor_id": visitor, "match_method": "cookie", "match_confidence": 1.0}
            self._expect(out == want, "affixo", body, out)
            self.affixo.add(visitor)
            self.code_of[visitor] = code

    async def _echo_redirect(self, code: str) -> None:
        assert self._http is not None
        sent = time.monotonic()
        async with self._http.get(f"{self.base}/r/{code}", allow_redirects=False) as r:
            await r.read()
            location = r.headers.get("Location", "")
        self.record.answers.append((sent, time.monotonic() - sent, "redirect", r.status))
        self.record.statuses[f"redirect {r.status}"] += 1
        click = (parse_qs(urlsplit(location).query).get("refstream_click_id") or [""])[0]
        if r.status != 302 or not click:
            return
        # the load's first link was made by the CLI with its default URL; the others with their own
        self._expect(
            code == self.codes[0] or location.startswith(f"https://shop.test/{code}"), "redirect", code, location
        )
        self._mint(click)
        marker = click.removeprefix("clk_")
        self.record.attempted.add(marker)
        self.record.accept("redirect", marker)
        self.code_of[marker] = code

    async def _sold(self, kind: str, path: str, body: dict[str, Any], invoice: str) -> dict[str, Any] | None:
        """The sale's answer when 2xx; a refusal's invoice remembered."""
        assert self._http is not None
        sent = time.monotonic()
        async with self._http.post(self.base + path, json=body, headers=self._auth()) as r:
            raw = await r.read()
            unknown = r.headers.get(MAY_BE_STORED[0], "").lower() == MAY_BE_STORED[1]
        self.record.answers.append((sent, time.monotonic() - sent, kind, r.status))
        self.record.statuses[f"{kind} {r.status}"] += 1
        if r.status != 200:
            if not unknown:
                self.sales_refused.add(invoice)
            return None
        self.sales.add(invoice)
        out = orjson.loads(raw) if raw else None
        return out if isinstance(out, dict) else {"not an object": out}

    async def _echo_sale(self, _code: str) -> None:
        invoice, customer = f"inv-{uuid.uuid4().hex}", f"sc-{uuid.uuid4().hex}"
        amount = self.rng.randrange(100, 100_000)
        body = {"customerExternalId": customer, "amount": amount, "invoiceId": invoice, "paymentProcessor": "stripe"}
        out = await self._sold("sale", "/api/track/sale", body, invoice)
        if out is not None:
            sale = out.get("sale") or {}
            got = ((out.get("customer") or {}).get("externalId"), sale.get("amount"), sale.get("invoiceId"))
            self._expect(got == (customer, amount, invoice), "sale", body, out)

    async def _echo_conversion(self, _code: str) -> None:
        invoice, customer = f"inv-{uuid.uuid4().hex}", f"cc-{uuid.uuid4().hex}"
        amount = self.rng.randrange(100, 100_000)
        body = {"customer_id": customer, "amount": amount, "invoice_id": invoice}
        out = await self._sold("conversion", "/v1/track/conversion", body, invoice)
        if out is not None:
            got = (out.get("ok"), out.get("customer_id"), out.get("amount"), out.get("invoice_id"))
            self._expect(got == (True, customer, amount, invoice), "conversion", body, out)

    async def _echo_batch(self, code: str) -> None:
        visitor = f"vb-{uuid.uuid4().hex}"
        items: list[dict[str, Any]] = [
            {"type": "click", "ref": code, "visitor_id": visitor, "ip": "203.0.113.9", "user_agent": CHROME},
            {"type": "conversion", "code": self.rng.choice(self.codes), "referred_session_id": uuid.uuid4().hex},
        ]
        codes = [code, items[1]["code"]]
        if self._pairs:
            click_id, click_code = self._pairs.pop(self.rng.randrange(len(self._pairs)))
            items.append(
                {
                    "type": "lead",
                    "clickId": click_id,
                    "eventName": "Sign Up",
                    "customerExternalId": f"bl-{uuid.uuid4().hex}",
                }
            )
            codes.append(click_code)
        status, out = await self._post("batch", "/v1/events/batch", None, json=items, headers=self._auth())
        if status != 200:
            return
        results = out.get("results") if isinstance(out, dict) else None
        if (
            not isinstance(out, dict)  # and so no results
            or not isinstance(results, list)
            or [r.get("index") for r in results] != list(range(len(items)))
        ):
            self._expect(False, "batch", items, out)
            return
        self._expect(out.get("accepted") == sum(bool(r.get("ok")) for r in results), "batch", items, out)
        for item, r, item_code in zip(items, results, codes, strict=True):
            if not r.get("ok"):
                self._expect(r.get("error") in ITEM_FAILURES, "batch", item, r)
                continue
            event_id = r.get("event_id")
            if not isinstance(event_id, str):
                self._expect(False, "batch", item, r)
                continue
            if item["type"] == "click":
                self._expect(r.get("visitor_id") == visitor and r.get("match_method") == "cookie", "batch", item, r)
            self._mint(event_id)
            marker = event_id.replace("-", "")
            self.record.attempted.add(marker)
            self.record.accept("batch", marker)
            self.code_of[marker] = item_code


async def sales_stored_once(check: Checker, load: EchoLoad) -> list[str]:
    """Every invoice answered 2xx stored once; none answered only a refusal stored."""
    stored = {
        r["invoice_id"]: r["n"] for r in await check.fetch("SELECT invoice_id, count(*) AS n FROM sales GROUP BY 1")
    }
    problems = []
    if missing := [i for i in load.sales if i not in stored]:
        problems.append(f"I1: {len(missing)} sales answered 2xx not stored, e.g. {missing[:3]}")
    if twice := {i: n for i, n in stored.items() if n > 1}:
        problems.append(f"I1: {len(twice)} invoices stored more than once, e.g. {list(twice.items())[:3]}")
    if kept := [i for i in load.sales_refused if i in stored]:
        problems.append(f"refused and stored: {len(kept)} sales, e.g. {kept[:3]}")
    return problems


async def misattributed(check: Checker, code_of: dict[str, str]) -> list[str]:
    """Accepted events stored on a link other than the one their request named (read after
    the drain): the edge resolved the link from another request's reply."""
    rows = await check.fetch(
        f"SELECT CASE e.dialect WHEN 'affixo' THEN e.visitor_id ELSE {MARKER_SQL} END AS marker, l.code"
        " FROM events e LEFT JOIN links l ON l.id = e.link_id"
    )
    wrong = [
        (r["marker"], code_of[r["marker"]], r["code"])
        for r in rows
        if r["marker"] in code_of and r["code"] != code_of[r["marker"]]
    ]
    if not wrong:
        return []
    return [f"{len(wrong)} events stored on another link than their request's, e.g. (marker, sent, stored) {wrong[:3]}"]
