"""The checker's part for issue 64's five cases (``cases.py``), once the run is healed,
drained and swept:

- ``shared_browser``: a customer whose browser another customer shared, never erased
  themselves, whose lead is stored, is whole after the other's erasure: ``GET
  /v1/customers/<id>`` a 200 with their email and name, their lead's row with their email
  (docs/privacy.md, *A browser two customers share*); ``erased_kept``: the erased one's
  ``GET`` (their erasure answered 2xx) is not a 404;
- ``placeholder_visitor``: two browsers (two operations, or two items of a batch) that sent
  a placeholder fingerprint handed one visitor, by an answer or a row, or a visitor that is
  itself a placeholder (docs/http-api.md, *Placeholder ids*);
- ``derived_currency``: a reversal or a clawback, anywhere in the ledger, in another
  currency than the row it takes back (or taking back no row) (docs/http-api.md,
  *Commissions and payouts*: "a row that takes another back is in that row's currency");
  ``rule_change_ledger``: a source of the program whose rules changed (``World.rc_program``)
  netting otherwise, per currency, than the rules each row earned under
  (``ingest.contract.earnings`` given each row's rules);
- ``identity_redacted``: a customer's name or invoice equal to an erased affiliate's name
  or external id, changed; ``affiliate_kept``: the affiliate's own name, email or external
  id still on their row after their erasure was answered 2xx (docs/privacy.md,
  *Affiliates and participants*);
- ``dnt_list``: the do-not-track list's listing (every page of ``GET /v1/suppressions``)
  naming an entry twice, or not naming one the table holds, or one it does not; an entry
  answered 201 not listed (``lost``), listed though only refused (``refusal_counted``), its
  answer's id not its own (``foreign_answer``), a placeholder listed or refused otherwise
  than 400 (``wrong_refusal``). (That a listed identity's events are stored nowhere:
  ``checker.py``'s ``suppressed_stored``; that others' are stored: its ``lost``.)
"""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import aiohttp

from ingest.contract import earnings, ids, suppression
from ingest.contract.commission import Rules

from .._checks import Checker
from .cases import DNT_PLACEHOLDERS, ID_EXTERNAL, ID_NAME, RULES
from .history import History, Op
from .ops import World

# every reversal and clawback, with the currency of the row it takes back (None: no such row)
DERIVED = """SELECT c.kind, c.rule, c.source_id, c.sale_id, c.amount, c.currency,
       (SELECT o.currency FROM commissions o
         WHERE o.kind = CASE WHEN c.kind = 'reversal' AND c.rule = 'lead' THEN 'lead' ELSE 'sale' END
           AND o.source_id = CASE WHEN c.kind = 'clawback' THEN c.sale_id ELSE c.source_id END) AS of_currency
FROM commissions c WHERE c.kind IN ('reversal', 'clawback')"""
LIST_LIMIT = 97  # a page of the do-not-track list: its boundaries fall anywhere


def derived_problems(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Each reversal or clawback not in the currency of the row it takes back."""
    out = []
    for r in rows:
        taken = r["sale_id"] if r["kind"] == "clawback" else r["source_id"]
        if r["of_currency"] is None:
            out.append(f"{r['kind']} {r['amount']} {r['currency']} of {taken}: it takes back no row")
        elif r["of_currency"] != r["currency"]:
            out.append(f"{r['kind']} {r['amount']} {r['currency']} of {taken}, earned in {r['of_currency']}")
    return out


def ok(op: Op | None) -> bool:
    return op is not None and any(a.outcome == "ok" for a in op.attempts)


class Judge:
    def __init__(self, check: Checker, history: History, world: World, edge: str | None, by_token: Any) -> None:
        self.check, self.h, self.world, self.edge, self.by_token = check, history, world, edge, by_token
        self.out: dict[str, list[str]] = defaultdict(list)
        self.http: aiohttp.ClientSession | None = None

    def cases(self, name: str) -> list[Op]:
        return [o for o in self.h.ops.values() if o.echo.get("case") == name and o.skipped is None]

    async def get(self, path: str) -> tuple[int, Any]:
        assert self.http is not None and self.edge is not None
        auth = {"Authorization": f"Bearer {self.world.api_key}"}
        async with self.http.get(self.edge + path, headers=auth) as r:
            return r.status, await r.json(content_type=None)

    async def run(self) -> dict[str, list[str]]:
        self.out["derived_currency"] += derived_problems(await self.check.fetch(DERIVED))
        await self._rule_changes()
        self._placeholders()
        if self.edge is not None:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as self.http:
                await self._shared()
                await self._identity()
                await self._dnt()
        return dict(self.out)

    # -- shared: two customers of one browser, one erased ------------------------------

    async def _shared(self) -> None:
        for erase in self.cases("shared"):
            if erase.kind != "erase":
                continue
            kept, gone = self.h.op(erase.echo["kept"]), erase.echo["customer"]
            assert kept is not None
            # their lead stored, and the other's erasure answered: until then the browser's one
            # customers row holds whichever customer's fields came last (docs/privacy.md, *A
            # browser two customers share*; seed 2000, its erasure never answered)
            stored = kept.skipped is None and bool(self.by_token.get(kept.token))
            if stored and ok(erase):
                status, body = await self.get(f"/v1/customers/{kept.token}")
                want = {"email": kept.echo["email"], "name": kept.echo["name"]}
                got = {k: body.get(k) for k in want} if isinstance(body, dict) else body
                if status != 200 or got != want:
                    self.out["shared_browser"].append(
                        f"customer {kept.token} (their browser's other customer {gone} erased): GET {status}"
                        f" {got}, not 200 {want}"
                    )
            if stored:
                rows = await self.check.fetch(
                    "SELECT payload->>'email' AS email FROM events WHERE type = 2 AND customer_external_id = $1",
                    kept.token,
                )
                if [r["email"] for r in rows] != [kept.echo["email"]]:
                    self.out["shared_browser"].append(f"customer {kept.token}'s lead rows hold {rows}")
            if ok(erase):
                status, _ = await self.get(f"/v1/customers/{gone}")
                if status != 404:
                    self.out["erased_kept"].append(f"customer {gone}, erased (a browser shared): GET {status}")

    # -- fp: placeholder fingerprints ---------------------------------------------------

    def _placeholders(self) -> None:
        """Each browser's visitors (its answers' and its rows'); no visitor two browsers',
        nor any other row's, nor a placeholder."""
        owners: dict[str, set[str]] = defaultdict(set)
        for rows in self.by_token.values():
            for r in rows:
                if r["type"] == 1 and r["visitor_id"]:
                    owners[r["visitor_id"]].add(r["token"])
        mine: dict[str, set[str]] = defaultdict(set)  # visitor -> the browsers (unit tokens) handed it
        for op in self.cases("fp"):
            for i, unit in enumerate(op.units):
                for outcome, a in op.unit_outcomes(i):
                    if outcome != "ok" or not isinstance(a.body, dict):
                        continue
                    body = a.body if op.kind == "affixo" else (a.body.get("results") or [{}] * (i + 1))[i]
                    if isinstance(body, dict) and body.get("visitor_id"):
                        mine[body["visitor_id"]].add(unit.token)
                for r in self.by_token.get(unit.token, []):
                    if r["visitor_id"]:
                        mine[r["visitor_id"]].add(unit.token)
        for visitor, browsers in mine.items():
            others = (owners.get(visitor, set()) - browsers) | (browsers if len(browsers) > 1 else set())
            if ids.placeholder(visitor):
                self.out["placeholder_visitor"].append(f"browsers {sorted(browsers)} handed the visitor {visitor!r}")
            elif others:
                self.out["placeholder_visitor"].append(
                    f"visitor {visitor} of a placeholder fingerprint's click is also {sorted(others)}'s"
                )

    # -- rules: a program's rules changed between a customer's events -----------------

    async def _rule_changes(self) -> None:
        steps = self.cases("rules")
        lead = next((o for o in steps if o.kind == "lead"), None)
        poll = next((o for o in steps if o.kind == "poll"), None)
        imported = next((o for o in steps if o.kind == "import"), None)
        _, leads, sales, rows = await self.check.ledger_history(self.world.workspace_id)  # on its shard
        program = self.world.rc_program
        leads = [x for x in leads if x.program_id == program]
        sales = [x for x in sales if x.program_id == program]
        sources = {x.event_id for x in leads} | {x.event_id for x in sales}
        rows = [r for r in rows if (r.sale_id if r.kind == "clawback" else r.source_id) in sources]
        # the rules each row earned under: the live lead, stored before the first change (its
        # customer answered); what was imported, after the first change and before the second
        if lead is None or not leads:
            return
        live = poll is not None and poll.attempts and poll.attempts[-1].status == 200
        imported_ids = {uuid.UUID(hex=h) for h in imported.echo["ids"]} if imported is not None else set()
        older = any(x.event_id in imported_ids and x.dialect == earnings.IMPORT_DIALECT for x in leads)
        if not live and not older:  # the live lead the customer's first, stored under rules not known
            return
        first, second = Rules.from_json(RULES[0]), Rules.from_json(RULES[1])
        leads = [replace(x, rules=second if x.event_id in imported_ids else first) for x in leads]
        sales = [replace(x, rules=second) for x in sales]
        want = earnings.expected({program: Rules.from_json(RULES[2])}, leads, sales, import_earns=True)
        for k, x, s in earnings.differences(want, earnings.standing(rows)):
            self.out["rule_change_ledger"].append(f"{k[0]} {k[1]}: stored {s}, by the rules it earned under {x}")

    # -- identity: an affiliate erased, a customer of their name and invoice -----------

    async def _identity(self) -> None:
        steps = self.cases("identity")
        erase = next((o for o in steps if o.kind == "erase-affiliate"), None)
        if erase is None or not any(a.outcome != "refused" for a in erase.attempts):
            return
        lead = next((o for o in steps if o.kind == "lead"), None)
        sale = next((o for o in steps if o.kind == "sale"), None)
        if lead is not None and self.by_token.get(lead.token):
            status, body = await self.get(f"/v1/customers/{lead.token}")
            name = body.get("name") if isinstance(body, dict) else None
            if status != 200 or name != ID_NAME:
                why = f"customer {lead.token} named as the erased affiliate: GET {status}, name {name!r}"
                self.out["identity_redacted"].append(why)
        if sale is not None and self.by_token.get(sale.token):
            rows = await self.check.fetch("SELECT invoice_id FROM sales WHERE metadata->>'gen' = $1", sale.token)
            if [r["invoice_id"] for r in rows] != [ID_EXTERNAL]:
                why = (
                    f"sale {sale.token} invoiced as the erased affiliate's external id holds {[dict(r) for r in rows]}"
                )
                self.out["identity_redacted"].append(why)
        if ok(erase):
            row = (
                await self.check.fetch(
                    "SELECT external_id, name, email FROM affiliates WHERE id = $1", uuid.UUID(self.world.id_affiliate)
                )
            )[0]
            if row["external_id"] == ID_EXTERNAL or row["name"] is not None or row["email"] is not None:
                self.out["affiliate_kept"].append(f"the erased affiliate's row still holds {dict(row)}")

    # -- dnt: a long do-not-track list ------------------------------------------------

    async def _dnt(self) -> None:
        bulk = next((o for o in self.cases("dnt") if o.kind == "suppress-bulk"), None)
        if bulk is None:
            return
        ws = self.world.workspace_id
        salt = bytes((await self.check.fetch("SELECT salt FROM erasure_salt"))[0]["salt"])
        held = {
            bytes(r["digest"]).hex()
            for r in await self.check.fetch("SELECT digest FROM suppressions WHERE workspace_id = $1", uuid.UUID(ws))
        }
        for i, entry in enumerate(bulk.body):
            tries = [bulk.attempts[j] for j in bulk.echo.get("by_value", {}).get(i, [])]
            d = suppression.digest(salt, ws, entry["kind"], entry["value"]).hex()
            what = f"entry {i} ({entry['kind']}): " + "; ".join(a.line() for a in tries)
            outcomes = {a.outcome for a in tries}
            for a in tries:
                if a.outcome == "error":
                    self.out["5xx"].append(what)
            if entry["value"] in DNT_PLACEHOLDERS:
                if outcomes & {"ok"} or any(a.outcome == "refused" and a.status not in (400, 503) for a in tries):
                    self.out["wrong_refusal"].append(f"a placeholder, to be refused 400: {what}")
            elif "ok" in outcomes:
                if d not in held:
                    self.out["lost"].append(f"answered 201, not listed: {what}")
                named = {a.body.get("id") for a in tries if a.outcome == "ok" and isinstance(a.body, dict)}
                if named != {d}:
                    self.out["foreign_answer"].append(f"answered ids {named}, not its own: {what}")
            elif outcomes == {"refused"} and d in held:
                self.out["refusal_counted"].append(f"refused, and listed: {what}")
        listed: Counter[str] = Counter()
        before: str | None = None
        pages = 0
        while True:
            status, page = await self.get(
                f"/v1/suppressions?limit={LIST_LIMIT}" + (f"&before={before}" if before else "")
            )
            pages += 1
            if status != 200 or pages > len(held) // LIST_LIMIT + 3:
                self.out["dnt_list"].append(f"page {pages} of the listing: {status} {str(page)[:200]}")
                return
            listed.update(e["id"] for e in page["data"])
            before = page["next"]
            if before is None:
                break
        if twice := [k for k, n in listed.items() if n > 1]:
            self.out["dnt_list"].append(f"{len(twice)} entries listed twice over {pages} pages, e.g. {twice[:3]}")
        if missed := held - set(listed):
            self.out["dnt_list"].append(f"{len(missed)} of {len(held)} entries listed by no page of {pages}")
        if extra := set(listed) - held:
            self.out["dnt_list"].append(f"{len(extra)} entries listed that the table does not hold")


async def problems(
    check: Checker, history: History, world: World, edge: str | None, by_token: Any
) -> dict[str, list[str]]:
    return await Judge(check, history, world, edge, by_token).run()
