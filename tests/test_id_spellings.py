"""One normalisation of client-chosen ids (``ingest.contract.ids``) at every door that takes
one: a customer's external id, a Bricqs participant (an affiliate by external id), a visitor
id. Spellings the rule folds together (an NBSP or a zero-width space at an end, NFC against
NFD, a BOM) name one subject at every route and command, the erasures included; an id
stored before the rule is still found. The doors are found, not listed by hand: every
request field, path or query parameter and CLI option that takes such an id must be one
this test drives (``DOORS``), so a new door cannot be left out."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import click
import orjson
import pytest

from ingest.contract import erasure as ledger
from ingest.contract import fields, ids
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from refstream.cli import main as cli_main
from workers.ops import import_formats

from ._openapi import OPERATIONS
from ._procs import Procs
from ._world import World, call
from .test_erasure import erase_key
from .test_external_ids import held
from .test_import import import_cli
from .test_sales import sale_body
from .test_seed_004_refport import lead_body, new_click

# each family: spellings the rule folds into one id ({t}: a token per test)
FAMILIES = {
    "nbsp": ("ana\u00a0maria-{t}", "ana\u00a0maria-{t}\u00a0", "\u200bana\u00a0maria-{t}"),
    "nfd": ("Jos\u00e9-{t}", "Jose\u0301-{t}", "\ufeffJose\u0301-{t}\t"),
}

# every door that takes a client-chosen id of a person, by where it is found: (request
# schema, field), (method, path, parameter), (CLI command, option), ("import", row field).
# The tests below drive each one; ``test_every_door_that_takes_an_id_is_driven_here`` finds them.
DOORS: dict[str, set[tuple[str, ...]]] = {
    "customer": {
        ("TrackLead", "customerExternalId"),  # Refport's and Dub's lead
        ("BatchLeadItem", "customerExternalId"),
        ("TrackSale", "customerExternalId"),  # Refport's and Dub's sale
        ("BatchSaleItem", "customerExternalId"),
        ("AffixoConversion", "customer_id"),
        ("GET", "/v1/customers/{external_id}", "external_id"),
        ("DELETE", "/v1/customers/{external_id}", "external_id"),
        ("GET", "/v1/conversions", "customer_id"),
        ("NewSuppression", "value"),  # kind customer (and visitor, below)
        ("erase", "--customer"),
        ("import", "customer_id"),
    },
    "participant": {
        ("BricqsGenerate", "participant_id"),
        ("NewAffiliate", "external_id"),
        ("GET", "/api/v1/referrals/stats/{participant_id}", "participant_id"),
        ("DELETE", "/v1/participants/{participant_id}", "participant_id"),
        ("erase", "--participant"),
    },
    "visitor": {
        ("AffixoClick", "visitor_id"),
        ("BatchClickItem", "visitor_id"),
        ("BricqsConvert", "referred_session_id"),  # a referred session: the conversion's visitor
        ("BatchConversionItem", "referred_session_id"),
        ("import", "visitor_id"),
    },
}
# fields named like a person's id that are another name of one above, or refstream's own ids
NOT_A_PERSON: set[tuple[str, ...]] = {
    ("TrackLead", "externalId"),  # customerExternalId's older names: read into it
    ("TrackLead", "customerId"),
    ("TrackSale", "externalId"),
    ("TrackSale", "customerId"),
    ("AffitorClick", "session_id"),  # a page view's session: the click's data, no one's key
}
_ID_NAME = re.compile(
    r"(?i)^(customer_?(external_?)?id|external_?id|participant_?id|visitor_?id|referred_session_id|session_?id"
    r"|customer|participant|visitor)$"
)
_ID_PATTERNS = (fields.EXTERNAL_ID, fields.VISITOR_ID)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def spellings(family: str, token: str) -> tuple[str, str, str]:
    a, b, c = (s.format(t=token) for s in FAMILIES[family])
    return a, b, c


def _id_fields(name: str, schema: dict[str, Any]) -> set[tuple[str, str]]:
    """A request schema's fields that take a person's id: of the external id's (or a visitor
    id's) documented pattern, in the schema or one of its ``oneOf`` branches, or named so."""
    out = set()
    for branch in [schema, *schema.get("oneOf", [])]:
        for prop, ps in branch.get("properties", {}).items():
            if ps.get("pattern") in _ID_PATTERNS or _ID_NAME.match(prop):
                out.add((name, prop))
    return out


def _commands(cmd: click.Command, name: str) -> list[tuple[str, click.Command]]:
    if isinstance(cmd, click.Group):
        return [c for sub_name, sub in cmd.commands.items() for c in _commands(sub, sub_name)]
    return [(name, cmd)]


def test_every_door_that_takes_an_id_is_driven_here() -> None:
    """Every request field of the external id's (or a visitor id's) type or named like one,
    every path or query parameter and CLI option named like one, and the import's rows'
    fields: each is a door of ``DOORS``, which the tests below drive."""
    found: set[tuple[str, ...]] = set()
    for op in OPERATIONS:
        for param in [*re.findall(r"\{([^}]+)\}", op.path), *op.query]:
            if _ID_NAME.match(param):
                found.add((op.method.upper(), op.path, param))
        if op.request is not None:
            schema = op.request.model_json_schema()
            for name, sub in [(op.request.__name__, schema), *schema.get("$defs", {}).items()]:
                found |= _id_fields(name, sub)
    for command_name, command in _commands(cli_main, "refstream"):
        for param in command.params:
            found |= {(command_name, o) for o in getattr(param, "opts", []) if _ID_NAME.match(o.lstrip("-"))}
    for model in (import_formats._Click, import_formats._Lead, import_formats._Sale):
        found |= {("import", prop) for _, prop in _id_fields("import", model.model_json_schema())}
    doors = set().union(*DOORS.values())
    assert found - doors - NOT_A_PERSON == set(), "doors that take an id this test does not drive"
    assert doors - found == set(), "doors listed here that no longer take an id"


@pytest.mark.parametrize("family", sorted(FAMILIES))
async def test_a_customer_is_one_at_every_door_whichever_spelling_names_it(
    family: str,
    edge: str,
    world: World,
    pg: asyncpg.Pool,
    redis: Any,
    keys: Keys,
    settings: Settings,
    procs: Procs,
    tmp_path: Path,
    drain: Any,
) -> None:
    token = secrets.token_hex(3)
    a, b, c = spellings(family, token)
    normal = ids.normalize(a)
    assert ids.normalize(b) == ids.normalize(c) == normal and len({a, b, c}) == 3
    key = auth(world.api_key)
    # leads: Refport's, Dub's, the batch's; sales: Refport's, Dub's, Affixo's, the batch's
    status, out, _ = await call(
        "POST", f"{edge}/api/track/lead", json=lead_body(await new_click(edge), customerExternalId=b), headers=key
    )
    assert (status, out["customer"]["externalId"]) == (200, normal), out
    body = lead_body(await new_click(edge), customerExternalId=c, eventName="Trial")
    status, out, _ = await call("POST", f"{edge}/track/lead", json=body, headers=key)
    assert status == 200, out
    for route, spelling, invoice in (("/api/track/sale", a, "in_a"), ("/track/sale", b, "in_b")):
        body = sale_body(customerExternalId=spelling, invoiceId=f"{invoice}-{token}")
        status, out, _ = await call("POST", f"{edge}{route}", json=body, headers=key)
        assert status == 200, (route, out)
    conversion = {"customer_id": c, "amount": 100, "invoice_id": f"in_c-{token}"}
    status, out, _ = await call("POST", f"{edge}/v1/track/conversion", json=conversion, headers=key)
    assert (status, out.get("customer_id")) == (200, normal), out
    batch = [
        {"type": "lead", **lead_body(await new_click(edge), customerExternalId=a, eventName="Webinar")},
        {"type": "sale", **sale_body(customerExternalId=b, invoiceId=f"in_d-{token}")},
    ]
    status, out, _ = await call("POST", f"{edge}/v1/events/batch", json=batch, headers=key)
    assert status == 200 and all(r["ok"] for r in out["results"]), out
    await drain()  # the import yields to a live backlog
    at = (datetime.now(UTC) - timedelta(days=2)).isoformat()
    rows = [
        {"type": "click", "id": "c1", "timestamp": at, "link": world.link["code"]},
        {"type": "lead", "id": "l1", "timestamp": at, "click": "c1", "customer_id": c, "event_name": "Import"},
        {"type": "sale", "id": "s1", "timestamp": at, "customer_id": a, "amount": 100},
    ]
    path = tmp_path / "history.ndjson"
    path.write_text("\n".join(orjson.dumps(r).decode() for r in rows) + "\n")
    assert (await import_cli(settings, path, world))["stored"] == 3
    await drain()

    stored = await pg.fetch(
        "SELECT external_id FROM customers UNION SELECT customer_external_id FROM sales"
        " UNION SELECT customer_external_id FROM customer_leads UNION SELECT customer_external_id FROM events"
        " WHERE customer_external_id IS NOT NULL"
    )
    assert {r[0] for r in stored} == {normal}  # one subject, as every door stored it
    assert await pg.fetchval("SELECT count(*) FROM sales") == 5
    for spelling in (a, b, c):
        named = quote(spelling, safe="")
        status, out, _ = await call("GET", f"{edge}/v1/customers/{named}", headers=key)
        assert (status, out.get("external_id")) == (200, normal), (spelling, out)
        status, out, _ = await call("GET", f"{edge}/v1/conversions?customer_id={named}", headers=key)
        assert status == 200 and len(out["data"]) == 5, (spelling, out)
    listed = set()
    for spelling in (a, b, c):
        status, out, _ = await call(
            "POST", f"{edge}/v1/suppressions", json={"kind": "customer", "value": spelling}, headers=key
        )
        assert status == 201, out
        listed.add(out["id"])
    assert len(listed) == 1  # one entry: the same customer

    eraser = await erase_key(pg, redis, keys, world, ["erase"])
    status, done, _ = await call("DELETE", f"{edge}/v1/customers/{quote(c, safe='')}", headers=auth(eraser))
    assert status == 202 and done["done"]["postgres"]["sales"] == 5, done
    assert await held(pg, a, b, c, normal) == []

    # the CLI's erasure: a customer a lead named one way, erased by another spelling
    other = [s.replace(token, f"{token}-cli") for s in (a, b)]
    body = lead_body(await new_click(edge), customerExternalId=other[0])
    status, out, _ = await call("POST", f"{edge}/api/track/lead", json=body, headers=key)
    assert status == 200, out
    await drain()
    assert await held(pg, ids.normalize(other[0]))
    out = await procs.cli("erase", "--customer", other[1], "--workspace", world.workspace_id)
    assert out["erasure"]["postgres"]["customers"] == 1, out
    assert await held(pg, *other, ids.normalize(other[0])) == []


@pytest.mark.parametrize("family", sorted(FAMILIES))
async def test_a_participant_is_one_at_every_door_whichever_spelling_names_it(
    family: str, edge: str, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys, procs: Procs
) -> None:
    """Issue 64 #3: ``generate`` for ``"ana\\u00a0maria"`` and its stats answered 200, and
    ``DELETE /v1/participants/ana%C2%A0maria`` 404; so did ``José`` deleted as NFD."""
    token = secrets.token_hex(3)
    a, b, c = spellings(family, token)
    normal = ids.normalize(a)
    x_key = {"X-API-Key": world.api_key}
    program2 = str(
        await pg.fetchval(
            "INSERT INTO programs (workspace_id, name) VALUES ($1::uuid, 'Second') RETURNING id", world.workspace_id
        )
    )
    generated = []
    for spelling in (a, b):
        status, out, _ = await call(
            "POST",
            f"{edge}/api/v1/referrals/generate",
            headers=x_key,
            json={"participant_id": spelling, "campaign_id": world.program_id},
        )
        assert (status, out.get("participant_id")) == (200, normal), out
        generated.append(out["code"])
    assert generated[0] == generated[1]  # one participant: one code
    status, out, _ = await call(
        "POST",
        f"{edge}/v1/affiliates",
        headers=auth(world.api_key),
        json={"program_id": program2, "external_id": c},
    )
    assert (status, out.get("external_id")) == (201, normal), out
    for spelling in (a, b, c):
        status, out, _ = await call("GET", f"{edge}/api/v1/referrals/stats/{quote(spelling, safe='')}", headers=x_key)
        assert (status, out.get("participant_id")) == (200, normal), (spelling, out)

    eraser = await erase_key(pg, redis, keys, world, ["erase"])
    status, out, _ = await call("DELETE", f"{edge}/v1/participants/{quote(a, safe='')}", headers=auth(eraser))
    assert status == 202 and len(out["erasures"]) == 2, out  # both campaigns' affiliate
    rows = await pg.fetch("SELECT external_id FROM affiliates WHERE external_id <> 'user_123'")
    assert len(rows) == 2 and all(ledger.is_pseudonym(r["external_id"]) for r in rows), rows
    status, out, _ = await call("GET", f"{edge}/api/v1/referrals/stats/{quote(b, safe='')}", headers=x_key)
    assert status == 404, out
    # made by one spelling, erased by each other one
    for n, (made, named) in enumerate(((b, c), (c, a), (a, b))):
        made, named = (s.replace(token, f"{token}-{n}") for s in (made, named))
        status, out, _ = await call(
            "POST",
            f"{edge}/api/v1/referrals/generate",
            headers=x_key,
            json={"participant_id": made, "campaign_id": world.program_id},
        )
        assert status == 200, out
        status, out, _ = await call("DELETE", f"{edge}/v1/participants/{quote(named, safe='')}", headers=auth(eraser))
        assert status == 202 and len(out["erasures"]) == 1, (made, named, out)

    # the CLI's erasure, by another spelling than generate's
    cli_a, cli_b = (s.replace(token, f"{token}-cli") for s in (a, b))
    status, out, _ = await call(
        "POST",
        f"{edge}/api/v1/referrals/generate",
        headers=x_key,
        json={"participant_id": cli_a, "campaign_id": world.program_id},
    )
    assert status == 200, out
    out = await procs.cli("erase", "--participant", cli_b, "--workspace", world.workspace_id)
    assert len(out["erasures"]) == 1, out
    assert await pg.fetchval("SELECT count(*) FROM affiliates WHERE external_id = $1", ids.normalize(cli_a)) == 0

    # one stored before the rule, as it was sent: found and erased by the spelling the rule writes
    old = f"old-{token}\u00a0"
    await pg.execute(
        "INSERT INTO affiliates (workspace_id, program_id, external_id) VALUES ($1::uuid, $2::uuid, $3)",
        world.workspace_id,
        world.program_id,
        old,
    )
    status, out, _ = await call("GET", f"{edge}/api/v1/referrals/stats/old-{token}", headers=x_key)
    assert status == 200, out
    status, out, _ = await call("DELETE", f"{edge}/v1/participants/old-{token}", headers=auth(eraser))
    assert status == 202 and len(out["erasures"]) == 1, out
    assert await pg.fetchval("SELECT count(*) FROM affiliates WHERE external_id = $1", old) == 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
async def test_a_visitor_is_one_at_every_door_whichever_spelling_names_it(
    family: str, edge: str, world: World, pg: asyncpg.Pool, settings: Settings, tmp_path: Path, drain: Any
) -> None:
    token = secrets.token_hex(3)
    a, b, c = spellings(family, token)
    normal = ids.normalize(a)
    key = auth(world.api_key)
    for spelling in (a, b, c):
        status, out, _ = await call(
            "POST", f"{edge}/v1/track/click", json={"ref": "PARTNER123", "visitor_id": spelling}, headers=key
        )
        assert (status, out.get("visitor_id"), out.get("match_method")) == (200, normal, "cookie"), out
    batch = [{"type": "click", "ref": "PARTNER123", "visitor_id": s} for s in (a, b, c)]
    status, out, _ = await call("POST", f"{edge}/v1/events/batch", json=batch, headers=key)
    assert status == 200 and [r.get("visitor_id") for r in out["results"]] == [normal] * 3, out
    await drain()  # the import yields to a live backlog
    at = (datetime.now(UTC) - timedelta(days=2)).isoformat()
    rows = [
        {"type": "click", "id": f"c{i}", "timestamp": at, "link": world.link["code"], "visitor_id": s}
        for i, s in enumerate((a, b, c))
    ]
    path = tmp_path / "clicks.ndjson"
    path.write_text("\n".join(orjson.dumps(r).decode() for r in rows) + "\n")
    assert (await import_cli(settings, path, world))["stored"] == 3
    await drain()
    stored = await pg.fetch("SELECT visitor_id, count(*) FROM events WHERE type = 1 GROUP BY visitor_id")
    assert [tuple(r) for r in stored] == [(normal, 9)]
    # a referred session (Bricqs), the conversion's visitor: one session however spelled
    answers = set()
    for spelling in (a, b, c):
        status, out, _ = await call(
            "POST", f"{edge}/api/v1/referrals/convert", json={"code": "PARTNER123", "referred_session_id": spelling}
        )
        assert status == 200, out
        answers.add(out["conversion_id"])
    assert len(answers) == 1  # the same session on the same code: one conversion
    listed = set()
    for spelling in (a, b, c):
        status, out, _ = await call(
            "POST", f"{edge}/v1/suppressions", json={"kind": "visitor", "value": spelling}, headers=key
        )
        assert status == 201, out
        listed.add(out["id"])
    assert len(listed) == 1
