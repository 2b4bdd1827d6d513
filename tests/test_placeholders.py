"""A placeholder (``undefined``, ``null``, ``[object Object]``...: what a careless tracker
sends when it holds no id; ``ingest.contract.ids.PLACEHOLDERS``, the one list, and
``ids.placeholder``, the one test) is no one's, for every identifier a client chooses, at
every door and in the import: two people who send it are two people, and the erasure of one
leaves the other. Each field's type says what a placeholder there is (docs/http-api.md,
"Placeholder ids"): taken as not sent (``OptionalId``, ``VisitorId``), or refused with the
door's 4xx (``ExternalId``, the import's row ids). The doors are generated from the routes'
request models (``OPERATIONS``) and the import's: a field named like an identifier that has
no policy, or a door this file cannot drive, fails ``test_every_identifier_has_a_policy``."""

from __future__ import annotations

import hashlib
import re
import typing
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import cycle
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from ingest.contract import fields, ids
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.edge.routes import batch
from workers.ops import import_formats

from ._openapi import OPERATIONS
from ._procs import env_for, run_command
from ._world import World, call
from .test_import import import_cli
from .test_sales import sale_body
from .test_seed_002_affitor import EXAMPLE as AFFITOR_CLICK
from .test_seed_004_refport import lead_body, new_click


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_two_visitors_who_send_undefined_are_two_customers_and_one_erasure_leaves_the_other(
    edge: str, world: World, pg: asyncpg.Pool, settings: Settings, drain: Callable[[], Awaitable[dict[str, int]]]
) -> None:
    answers = []
    for visitor in ("undefined", " NULL "):
        status, out, _ = await call(
            "POST",
            f"{edge}/v1/track/click",
            json={"ref": "PARTNER123", "visitor_id": visitor},
            headers=bearer(world.api_key),
        )
        assert status == 200, out
        answers.append(out)
    assert all(a["match_method"] == "new" and not ids.placeholder(a["visitor_id"]) for a in answers), answers
    assert answers[0]["visitor_id"] != answers[1]["visitor_id"]
    batch = [{"type": "click", "ref": "PARTNER123", "visitor_id": "undefined"}]
    status, out, _ = await call("POST", f"{edge}/v1/events/batch", json=batch, headers=bearer(world.api_key))
    assert status == 200 and out["results"][0]["ok"] and out["results"][0]["visitor_id"] != "undefined", out
    await drain()
    stored = await pg.fetch("SELECT visitor_id FROM events WHERE type = 1")
    assert len(stored) == 3 and len({r["visitor_id"] for r in stored}) == 3, stored
    assert not any(ids.placeholder(r["visitor_id"]) for r in stored)

    # a lead on each of the two Affixo clicks' visitors: two customers, and erasing one keeps the other
    for n, answer in enumerate(answers):
        click = await pg.fetchval(
            "SELECT event_id FROM events WHERE type = 1 AND visitor_id = $1", answer["visitor_id"]
        )
        body = lead_body(f"clk_{click.hex}", customerExternalId=f"person-{n}", customerEmail=f"p{n}@example.com")
        status, out, _ = await call("POST", f"{edge}/api/track/lead", json=body, headers=bearer(world.api_key))
        assert status == 200, out
    await drain()
    assert await pg.fetchval("SELECT count(*) FROM customers WHERE external_id LIKE 'person-%'") == 2
    code, _, err = await run_command(
        "erase", "--customer", "person-0", "--workspace", world.workspace_id, env=env_for(settings)
    )
    assert code == 0, err
    kept = await pg.fetchrow("SELECT email FROM customers WHERE external_id = 'person-1'")
    assert kept is not None and kept["email"] == "p1@example.com"


async def test_bricqs_refuses_a_placeholder_as_the_session_a_conversion_is_keyed_by(edge: str, world: World) -> None:
    for session in ("undefined", "null", "[object Object]"):
        status, out, _ = await call(
            "POST", f"{edge}/api/v1/referrals/convert", json={"code": "PARTNER123", "referred_session_id": session}
        )
        assert (status, out["error"]) == (400, "validation_error"), out


# -- every identifier, every door -------------------------------------------------------

# how placeholders arrive: as sent by a template, in another case, with whitespace or an
# invisible character at an end
SPELLINGS = (str, str.upper, str.title, lambda p: f" {p}\t", lambda p: f"\u200b{p}\u00a0", lambda p: f"\ufeff{p}")


def spelled() -> Iterator[str]:
    """Every placeholder of the one list, each spelled each way, round and round."""
    return cycle([f(p) for f in SPELLINGS for p in sorted(ids.PLACEHOLDERS)])


# named like a client's identifier (a field, a row's column)
_NAMED = re.compile(r"(?i)(^id$|_id$|Id$|fingerprint|session|^click$|dedupe|^value$)")
# identifiers that are not a client's choice of a person or browser, and why no placeholder
# policy applies; each is still driven below where a placeholder could reach it
NOT_CHOSEN = {
    # refstream's own ids (UUIDs, or click ids it mints as clk_<32 hex>): a placeholder names
    # none of them, so a door refuses it as it refuses any unknown one
    ("TrackLead", "clickId"): "refstream's click id: unknown, 400 INVALID_CLICK_ID",
    ("TrackSale", "clickId"): "refstream's click id: unknown, 400 INVALID_CLICK_ID",
    ("BatchLeadItem", "clickId"): "refstream's click id: unknown, invalid_click_id",
    ("NewAffiliate", "program_id"): "refstream's program id",
    ("NewLink", "affiliate_id"): "refstream's affiliate id",
    ("BricqsGenerate", "campaign_id"): "refstream's program id (a UUID)",
    ("NewPayout", "affiliate_id"): "refstream's affiliate id",
    ("NewKey", "affiliate_id"): "refstream's affiliate id",
}
_CLICK = "refstream's click id"
# a value whose kind says what it is: its placeholders are refused by the route itself
BY_KIND = {
    ("NewSuppression", "value"): "refused",
    # customerExternalId's older names: read into it (sent alone), whose type refuses one
    ("TrackLead", "externalId"): "refused",
    ("TrackLead", "customerId"): "refused",
    ("TrackSale", "externalId"): "refused",
    ("TrackSale", "customerId"): "refused",
}
OLD_NAMES = ("externalId", "customerId")


def policy(model: type[BaseModel], name: str) -> str | None:
    """What the field's type does with a placeholder: ``absent`` (taken as not sent),
    ``refused``, or None (no placeholder policy)."""
    checks = {getattr(m, "func", None) for m in model.model_fields[name].metadata}
    if checks & {fields.someones, fields.not_placeholder}:
        return "refused"
    if checks & {fields.no_ones, fields.visitor_id}:
        return "absent"
    return None


def request_models() -> dict[str, type[BaseModel]]:
    """Every request body's model by its schema name, the batch's items included."""
    out: dict[str, type[BaseModel]] = {}
    for op in OPERATIONS:
        if op.request is not None and issubclass(op.request, BaseModel):
            out[op.request.__name__] = op.request
    for item in typing.get_args(typing.get_args(batch.BatchItem)[0]):
        out[item.__name__] = item
    return out


def paths(schema: str) -> list[str]:
    """Every route that takes the model (a batch item: the batch's)."""
    if schema.startswith("Batch"):
        return ["/v1/events/batch"]
    return [op.path for op in OPERATIONS if op.request is not None and op.request.__name__ == schema]


def identifiers() -> dict[tuple[str, str], str | None]:
    """Every field named like an identifier of every request model and of the import's rows,
    with its policy."""
    found: dict[tuple[str, str], str | None] = {}
    for name, model in request_models().items():
        for field in model.model_fields:
            if _NAMED.search(field):
                found[(name, field)] = BY_KIND.get((name, field)) or policy(model, field)
    for model in (import_formats._Click, import_formats._Lead, import_formats._Sale, import_formats._Refund):
        for field in model.model_fields:
            if _NAMED.search(field):
                found[("import", field)] = policy(model, field)
    return found


def test_every_identifier_has_a_policy_and_a_door_here() -> None:
    """A field named like a client's identifier either has a placeholder policy from its type
    (and a door this file drives with placeholders), or is listed as no client's choice of a
    person: a new door, or a new identifier on one, cannot be left out."""
    found = identifiers()
    unplaced = sorted(k for k, p in found.items() if p is None and k not in NOT_CHOSEN)
    assert not unplaced, f"identifiers without a placeholder policy: {unplaced}"
    driven = (*DRIVERS, "import")  # the import's rows: test_the_import_takes_no_placeholder_as_anyones
    undriven = sorted(k for k, p in found.items() if k[0] not in driven and (p or _CLICK in NOT_CHOSEN.get(k, "")))
    assert not undriven, f"identifiers no test here drives: {undriven}"
    assert set(NOT_CHOSEN) <= set(found), sorted(set(NOT_CHOSEN) - set(found))


@given(st.sampled_from(sorted(ids.PLACEHOLDERS)), st.sampled_from(SPELLINGS), st.text(max_size=3))
def test_the_one_function_and_the_documented_pattern_agree(placeholder: str, spell: Any, noise: str) -> None:
    for value in (spell(placeholder), noise + spell(placeholder), spell(placeholder) + noise, noise):
        assert ids.placeholder(value) == bool(re.match(fields.PLACEHOLDER, value)), value
    assert ids.placeholder(spell(placeholder))


@dataclass
class Ctx:
    edge: str
    world: World
    eraser: str | None = None
    n: int = 0

    def next(self) -> int:
        self.n += 1
        return self.n


Body = Callable[[Ctx, str, str], Awaitable[tuple[str, str, dict[str, str], Any]]]


def _keyed(ctx: Ctx) -> dict[str, str]:
    return {"Authorization": f"Bearer {ctx.world.api_key}"}


async def _affixo_click(ctx: Ctx, field: str, value: str) -> tuple[str, str, dict[str, str], Any]:
    return "POST", "/v1/track/click", _keyed(ctx), {"ref": "PARTNER123", field: value}


async def _affixo_conversion(ctx: Ctx, field: str, value: str) -> tuple[str, str, dict[str, str], Any]:
    body = {"customer_id": f"cust-{ctx.next()}", "amount": 100, "invoice_id": f"in-ax-{ctx.next()}", field: value}
    return "POST", "/v1/track/conversion", _keyed(ctx), body


async def _lead(ctx: Ctx, field: str, value: str) -> tuple[str, str, dict[str, str], Any]:
    body = {**lead_body(await new_click(ctx.edge), customerExternalId=f"cust-{ctx.next()}"), field: value}
    if field in OLD_NAMES:
        del body["customerExternalId"]
    return "POST", "/api/track/lead", _keyed(ctx), body


async def _sale(ctx: Ctx, field: str, value: str) -> tuple[str, str, dict[str, str], Any]:
    body = {**sale_body(customerExternalId=f"cust-{ctx.next()}", invoiceId=f"in-rp-{ctx.next()}"), field: value}
    if field in OLD_NAMES:
        del body["customerExternalId"]
    return "POST", "/api/track/sale", _keyed(ctx), body


async def _refund(ctx: Ctx, field: str, value: str) -> tuple[str, str, dict[str, str], Any]:
    return (
        "POST",
        "/api/track/refund",
        _keyed(ctx),
        {"invoiceId": "in-none", "refundId": f"r-{ctx.next()}", field: value},
    )


async def _affitor(ctx: Ctx, field: str, value: str) -> tuple[str, str, dict[str, str], Any]:
    return "POST", "/api/v1/track/click", {}, {**AFFITOR_CLICK, field: value}


async def _convert(ctx: Ctx, field: str, value: str) -> tuple[str, str, dict[str, str], Any]:
    return "POST", "/api/v1/referrals/convert", {}, {"code": "PARTNER123", field: value}


async def _generate(ctx: Ctx, field: str, value: str) -> tuple[str, str, dict[str, str], Any]:
    body = {"participant_id": f"p-{ctx.next()}", "campaign_id": ctx.world.program_id, field: value}
    return "POST", "/api/v1/referrals/generate", {"X-API-Key": ctx.world.api_key}, body


async def _affiliate(ctx: Ctx, field: str, value: str) -> tuple[str, str, dict[str, str], Any]:
    body = {"program_id": ctx.world.program_id, "external_id": f"aff-{ctx.next()}", field: value}
    return "POST", "/v1/affiliates", _keyed(ctx), body


async def _suppression(ctx: Ctx, field: str, value: str) -> tuple[str, str, dict[str, str], Any]:
    kind = ("visitor", "customer")[ctx.next() % 2]
    return "POST", "/v1/suppressions", _keyed(ctx), {"kind": kind, field: value}


def _item(kind: str, make: Body) -> Body:
    async def body(ctx: Ctx, field: str, value: str) -> tuple[str, str, dict[str, str], Any]:
        _, _, _, one = await make(ctx, field, value)
        return "POST", "/v1/events/batch", _keyed(ctx), [{"type": kind, **one}]

    return body


async def _batch_conversion(ctx: Ctx, field: str, value: str) -> tuple[str, str, dict[str, str], Any]:
    return "POST", "/v1/events/batch", _keyed(ctx), [{"type": "conversion", "code": "PARTNER123", field: value}]


async def _batch_click(ctx: Ctx, field: str, value: str) -> tuple[str, str, dict[str, str], Any]:
    return "POST", "/v1/events/batch", _keyed(ctx), [{"type": "click", "ref": "PARTNER123", field: value}]


# each request model's door: a valid body with one field set
DRIVERS: dict[str, Body] = {
    "AffixoClick": _affixo_click,
    "AffixoConversion": _affixo_conversion,
    "TrackLead": _lead,
    "TrackSale": _sale,
    "RefportRefund": _refund,
    "AffitorClick": _affitor,
    "BricqsConvert": _convert,
    "BricqsGenerate": _generate,
    "NewAffiliate": _affiliate,
    "NewSuppression": _suppression,
    "BatchClickItem": _batch_click,
    "BatchLeadItem": _item("lead", _lead),
    "BatchSaleItem": _item("sale", _sale),
    "BatchConversionItem": _batch_conversion,
    "BatchRefundItem": _item("refund", _refund),
}


def _refused(status: int, out: Any) -> bool:
    if isinstance(out, dict) and "results" in out:  # the batch: its one item refused
        return status == 200 and not out["results"][0]["ok"]
    return 400 <= status < 500 or (status == 200 and out.get("success") is False)


def _taken(status: int, out: Any) -> bool:
    if isinstance(out, dict) and "results" in out:
        return status == 200 and out["results"][0]["ok"]
    return status in (200, 201, 202)


async def _placeholders_stored(pg: asyncpg.Pool) -> list[Any]:
    """Rows that hold a placeholder where an identifier is kept: an event's visitor or
    customer, any string of its payload, a customer's ids, an affiliate's."""
    found = []
    for r in await pg.fetch("SELECT visitor_id, customer_external_id, payload::text AS p FROM events"):
        payload = orjson.loads(r["p"]) if r["p"] else {}
        strings = [v for v in payload.values() if isinstance(v, str)] if isinstance(payload, dict) else []
        found += [v for v in (r["visitor_id"], r["customer_external_id"], *strings) if v and ids.placeholder(v)]
    for r in await pg.fetch(
        "SELECT visitor_id, external_id FROM customers UNION ALL SELECT NULL, external_id FROM affiliates"
    ):
        found += [v for v in tuple(r) if v and ids.placeholder(v)]
    return found


async def test_a_placeholder_is_no_ones_at_every_door(
    edge: str, world: World, pg: asyncpg.Pool, drain: Callable[[], Awaitable[dict[str, int]]]
) -> None:
    """Each identifier of each route, sent as placeholders of the one list spelled every
    way: refused with the door's 4xx where its type refuses one; taken, as if not sent, where
    its type takes it as absent, and stored nowhere."""
    ctx = Ctx(edge, world)
    values = spelled()
    checked = 0
    for (schema, field), what in sorted(identifiers().items()):
        if schema == "import" or (what is None and _CLICK not in NOT_CHOSEN.get((schema, field), "")):
            continue
        for route in paths(schema):  # Refport's lead and Dub's, ...
            for _ in range(2):
                value = next(values)
                method, _, headers, body = await DRIVERS[schema](ctx, field, value)
                status, out, _ = await call(method, f"{edge}{route}", json=body, headers=headers)
                assert status < 500, (route, field, value, status, out)
                if what == "absent":
                    assert _taken(status, out), (route, field, value, status, out)
                else:  # refused by its type, or (a click id) as one that names no click
                    assert _refused(status, out), (route, field, value, status, out)
                checked += 1
    assert checked >= 2 * 32, checked  # every identifier of every route
    await drain()
    assert await _placeholders_stored(pg) == []


async def test_placeholder_fingerprints_are_no_ones(
    edge: str, world: World, redis: Any, keys: Keys, drain: Callable[[], Awaitable[dict[str, int]]], pg: asyncpg.Pool
) -> None:
    """Issue 64 #6: two browsers each sending ``{"visitor_id": "undefined", "fingerprint":
    "undefined"}`` were one visitor (the second matched the first by its fingerprint, 0.8),
    and so was every later one for 90 days; ``null`` too, and through the batch. Each is a
    visitor of its own now, and no placeholder fingerprint is remembered."""
    key = {"Authorization": f"Bearer {world.api_key}"}
    seen: list[str] = []
    for fingerprint in ("undefined", "undefined", "null", " NULL", "[object Object]"):
        body = {"ref": "PARTNER123", "visitor_id": "undefined", "fingerprint": fingerprint}
        status, out, _ = await call("POST", f"{edge}/v1/track/click", json=body, headers=key)
        assert (status, out["match_method"], out["match_confidence"]) == (200, "new", 0.0), out
        seen.append(out["visitor_id"])
    items = [{"type": "click", "ref": "PARTNER123", "visitor_id": "null", "fingerprint": "null"}] * 2
    status, out, _ = await call("POST", f"{edge}/v1/events/batch", json=items, headers=key)
    assert status == 200 and [r["match_method"] for r in out["results"]] == ["new", "new"], out
    seen += [r["visitor_id"] for r in out["results"]]
    assert len(set(seen)) == len(seen), seen  # each browser its own visitor
    for fingerprint in ("undefined", "null", " NULL", "[object Object]"):
        digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:32]
        assert await redis.exists(keys.fingerprint(world.workspace_id, digest)) == 0, fingerprint
    # a real fingerprint still matches
    body = {"ref": "PARTNER123", "fingerprint": "fp-7d1c"}
    first = (await call("POST", f"{edge}/v1/track/click", json=body, headers=key))[1]
    again = (await call("POST", f"{edge}/v1/track/click", json=body, headers=key))[1]
    assert (again["match_method"], again["visitor_id"]) == ("fingerprint", first["visitor_id"])
    await drain()
    visitors = [r[0] for r in await pg.fetch("SELECT visitor_id FROM events WHERE type = 1")]
    assert len(set(visitors)) == len(seen) + 1 and not any(ids.placeholder(v) for v in visitors)


async def test_the_import_takes_no_placeholder_as_anyones(
    world: World, settings: Settings, pg: asyncpg.Pool, tmp_path: Path
) -> None:
    """The import, driven from the import's own identifiers (``identifiers()``): a row whose
    id is a placeholder is refused (it keys the row and its click's map, so a lead naming it
    would take a stranger's click); a lead's ``click`` that is one is taken as not given (its
    ``link`` then, else refused ``no_link``); a click's visitor and a refund's key that are
    ones, as not given; a customer id that is one, refused."""
    wanted = {f: p for (schema, f), p in identifiers().items() if schema == "import" and p is not None}
    assert wanted == {
        "id": "refused",
        "customer_id": "refused",
        "click": "absent",
        "visitor_id": "absent",
        "refund_id": "absent",
        "invoice_id": "refused",  # a refund's (which sale); a sale's is taken as not sent (below)
    }, wanted
    values = spelled()
    at = (datetime.now(UTC) - timedelta(days=2)).isoformat()
    link = world.link["code"]
    rows = [
        {"type": "click", "id": next(values), "timestamp": at, "link": link},  # refused: its id
        {"type": "click", "id": "c1", "timestamp": at, "link": link, "visitor_id": next(values)},
        {"type": "click", "id": "c2", "timestamp": at, "link": link, "visitor_id": next(values)},
        {"type": "lead", "id": "l1", "timestamp": at, "click": next(values), "link": link, "customer_id": "ann"},
        {"type": "lead", "id": "l2", "timestamp": at, "click": next(values), "customer_id": "bob"},  # no_link
        {"type": "lead", "id": "l3", "timestamp": at, "click": "c1", "customer_id": next(values)},  # refused
        {"type": "sale", "id": "s1", "timestamp": at, "customer_id": "ann", "amount": 100, "invoice_id": "in1"},
        {"type": "sale", "id": "s2", "timestamp": at, "customer_id": next(values), "amount": 100},  # refused
        {"type": "refund", "id": "r1", "timestamp": at, "invoice_id": "in1", "amount": 10, "refund_id": next(values)},
        # a sale's placeholder invoice is none (taken: else every such sale were one); a
        # refund's names no sale (refused)
        {"type": "sale", "id": "s3", "timestamp": at, "customer_id": "ann", "amount": 7, "invoice_id": next(values)},
        {"type": "sale", "id": "s4", "timestamp": at, "customer_id": "ann", "amount": 8, "invoice_id": next(values)},
        {"type": "refund", "id": "r2", "timestamp": at, "invoice_id": next(values), "amount": 1, "refund_id": "r2"},
    ]
    path = tmp_path / "history.ndjson"
    path.write_text("\n".join(orjson.dumps(r).decode() for r in rows) + "\n")
    out = await import_cli(settings, path, world, exit_code=3)
    assert out["stored"] == 7 and out["refused"] == {"invalid": 4, "no_link": 1}, out
    assert await pg.fetchval("SELECT count(*) FROM sales WHERE invoice_id IS NULL") == 2
    assert await _placeholders_stored(pg) == []
    visitors = {r[0] for r in await pg.fetch("SELECT visitor_id FROM events WHERE type = 1")}
    assert len(visitors) == 2  # two clicks of no visitor id: two visitors
    assert await pg.fetchval("SELECT refund_key FROM refunds") == "id:r1"  # the row's id, as for none


async def test_a_placeholder_order_or_key_makes_no_two_requests_one(
    edge: str, world: World, pg: asyncpg.Pool, drain: Callable[[], Awaitable[dict[str, int]]]
) -> None:
    """A careless client's unset variable as an invoice, a batch item's key or the
    ``Idempotency-Key`` header: each request is its own (stored, never answered as another's
    replay, never 422 for asking something else); a refund's key that is one is refused."""
    key = {"Authorization": f"Bearer {world.api_key}"}
    for i, invoice in enumerate(("undefined", "null", " NULL")):
        body = sale_body(customerExternalId=f"buyer-{i}", invoiceId=invoice, amount=100 + i)
        status, out, _ = await call("POST", f"{edge}/api/track/sale", json=body, headers=key)
        assert status == 200 and out["sale"]["invoiceId"] is None, out
    items = [{"type": "sale", "customerExternalId": "b", "amount": n, "invoiceId": "undefined"} for n in (5, 6)]
    items += [{"type": "sale", "customerExternalId": "b", "amount": 7, "idempotency_key": "null"}]
    status, out, _ = await call("POST", f"{edge}/v1/events/batch", json=items, headers=key)
    assert status == 200 and all(r["ok"] for r in out["results"]), out
    for n in (1, 2):  # one header placeholder, two different requests: both taken
        body = {"ref": "PARTNER123", "visitor_id": f"v-key-{n}"}
        status, out, _ = await call(
            "POST", f"{edge}/v1/track/click", json=body, headers={**key, "Idempotency-Key": "undefined"}
        )
        assert status == 200 and out["visitor_id"] == f"v-key-{n}", out
    refund = {"invoiceId": "in-x", "refundId": "undefined"}
    status, _, _ = await call("POST", f"{edge}/api/track/refund", json=refund, headers=key)
    assert 400 <= status < 500
    await drain()
    assert await pg.fetchval("SELECT count(*) FROM sales WHERE invoice_id IS NULL") == 6
    visitors = {r[0] for r in await pg.fetch("SELECT visitor_id FROM events WHERE type = 1")}
    assert {"v-key-1", "v-key-2"} <= visitors
