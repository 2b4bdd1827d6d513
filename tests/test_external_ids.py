"""External ids (``ingest.contract.ids``, docs/http-api.md "External ids"): one rule at
every door, so whatever a lead route accepted can be erased through
``DELETE /v1/customers/{external_id}``, however the id was written (a tab or NBSP at an
end, a zero-width space, combining characters, percent-encoded in the path); ids the rule
refuses are the route's 400; rows stored before the rule keep matching."""

from __future__ import annotations

import re
import secrets
import unicodedata
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest.contract import erasure as ledger
from ingest.contract import fields, ids
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings

from ._procs import Procs, env_for, run_command
from ._world import World, call
from .test_erasure import erase_key
from .test_import import import_cli
from .test_sales import sale_body
from .test_seed_004_refport import lead_body, new_click

# (the id a lead sends, the id the DELETE names): each pair is one person
TRICKY = {
    "tab": ("cust-{t}\t", "cust-{t}\t"),
    "nbsp": ("\u00a0cust-{t}", "\u00a0cust-{t}"),
    "nbsp-erased-plain": ("cust-{t}\u00a0", "cust-{t}"),
    "zwsp": ("\u200bcust-{t}\u200b", "\u200bcust-{t}\u200b"),
    "bom-and-newline": ("\ufeffcust-{t}\r\n", "cust-{t}"),
    "combining": ("cafe\u0301-{t}", "cafe\u0301-{t}"),
    "combining-erased-composed": ("cafe\u0301-{t}", "caf\u00e9-{t}"),
    "composed-erased-combining": ("caf\u00e9-{t}", "cafe\u0301-{t}"),
    "inner-space-and-slash": ("Ann Lee/{t}", "Ann Lee/{t}"),
}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def held(pg: asyncpg.Pool, *forms: str) -> list[Any]:
    """Rows of any table a lead or sale writes that still name one of ``forms``."""
    return [
        tuple(r)
        for r in await pg.fetch(
            "SELECT 'customers', external_id FROM customers WHERE external_id = ANY($1::text[])"
            " UNION ALL SELECT 'events', customer_external_id FROM events WHERE customer_external_id = ANY($1::text[])"
            " UNION ALL SELECT 'sales', customer_external_id FROM sales WHERE customer_external_id = ANY($1::text[])",
            list(forms),
        )
    ]


@pytest.mark.parametrize("case", sorted(TRICKY))
async def test_whatever_a_lead_route_accepted_is_erased_through_the_api(
    case: str, edge: str, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys, drain: Any
) -> None:
    token = secrets.token_hex(3)
    sent, named = (form.format(t=token) for form in TRICKY[case])
    normal = ids.normalize(sent)
    status, out, _ = await call(
        "POST",
        f"{edge}/api/track/lead",
        json=lead_body(await new_click(edge), customerExternalId=sent),
        headers=auth(world.api_key),
    )
    assert status == 200, out
    assert out["customer"]["externalId"] == normal  # stored and echoed as the rule writes it
    status, out, _ = await call(
        "POST", f"{edge}/api/track/sale", json=sale_body(customerExternalId=sent), headers=auth(world.api_key)
    )
    assert status == 200, out
    await drain()
    assert await held(pg, sent, normal, named)  # the test can fail: the person is stored
    status, out, _ = await call("GET", f"{edge}/v1/customers/{quote(named, safe='')}", headers=auth(world.api_key))
    assert (status, out.get("external_id")) == (200, normal), out

    eraser = await erase_key(pg, redis, keys, world, ["erase"])
    status, done, _ = await call("DELETE", f"{edge}/v1/customers/{quote(named, safe='')}", headers=auth(eraser))
    assert status == 202, done
    assert done["done"]["postgres"]["customers"] == 1 and done["done"]["postgres"]["sales"] == 1
    assert await held(pg, sent, normal, named) == []
    (row,) = await pg.fetch("SELECT external_id, email FROM customers")
    assert ledger.is_pseudonym(row["external_id"]) and row["email"] is None
    status, _, _ = await call("GET", f"{edge}/v1/customers/{quote(named, safe='')}", headers=auth(world.api_key))
    assert status == 404


@pytest.mark.parametrize("refused", ["a\tb", "a\u200bb", "a\u2028b", " \u00a0\t", "\u200b"])
async def test_an_id_the_rule_refuses_is_each_routes_400(refused: str, edge: str, world: World) -> None:
    status, out, _ = await call(
        "POST",
        f"{edge}/api/track/lead",
        json=lead_body(await new_click(edge), customerExternalId=refused),
        headers=auth(world.api_key),
    )
    assert (status, out["error"]["code"]) == (400, "VALIDATION_ERROR"), out
    status, out, _ = await call(
        "POST", f"{edge}/api/track/sale", json=sale_body(customerExternalId=refused), headers=auth(world.api_key)
    )
    assert (status, out["error"]["code"]) == (400, "VALIDATION_ERROR"), out
    status, out, _ = await call(
        "POST", f"{edge}/v1/track/conversion", json={"customer_id": refused, "amount": 1}, headers=auth(world.api_key)
    )
    assert status == 400, out
    status, out, _ = await call(
        "POST",
        f"{edge}/v1/events/batch",
        headers=auth(world.api_key),
        json=[
            {"type": "lead", **lead_body(await new_click(edge), customerExternalId=refused)},
            {"type": "conversion", "code": "PARTNER123", "referred_session_id": refused},
        ],
    )
    assert status == 200 and [r.get("error") for r in out["results"]] == ["invalid", "invalid"], out
    status, out, _ = await call(
        "POST", f"{edge}/api/v1/referrals/convert", json={"code": "PARTNER123", "referred_session_id": refused}
    )
    assert (status, out["error"]) == (400, "validation_error"), out


async def test_rows_stored_before_the_rule_are_still_erased_by_the_id_as_given(
    edge: str, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys
) -> None:
    """An earlier version stored ids as sent (a trailing NBSP, a tab inside): the erasure
    names them as given too, so changing the rule un-erases nobody."""
    eraser = await erase_key(pg, redis, keys, world, ["erase"])
    for i, stored in enumerate(["old\u00a0", "old\tone", "e\u0301t\u00e9"]):
        await pg.execute(
            "INSERT INTO customers (workspace_id, visitor_id, external_id, email, first_seen_at, last_seen_at)"
            " VALUES ($1, $2, $3, 'x@example.com', now(), now())",
            world.workspace_id,
            f"v-old-{i}",
            stored,
        )
        status, out, _ = await call("GET", f"{edge}/v1/customers/{quote(stored, safe='')}", headers=auth(world.api_key))
        assert (status, out.get("external_id")) == (200, stored), out
        status, done, _ = await call("DELETE", f"{edge}/v1/customers/{quote(stored, safe='')}", headers=auth(eraser))
        assert status == 202, done
        assert await held(pg, stored) == [], stored
    # and asked for by the spelling every door now writes
    for stored in ["new-old\u00a0", "cafe\u0301-old", "\ufeffbom-old"]:
        await pg.execute(
            "INSERT INTO customers (workspace_id, visitor_id, external_id, email, first_seen_at, last_seen_at)"
            " VALUES ($1, $2, $3, 'x@example.com', now(), now())",
            world.workspace_id,
            f"v-{stored}",
            stored,
        )
        await pg.execute(
            "INSERT INTO sales (event_id, workspace_id, customer_external_id, amount, currency,"
            " event_name, payment_processor, unattributed, dialect, received_at) VALUES"
            " (gen_random_uuid(), $1, $2, 1, 'usd', 'Purchase', 'custom', 'no_lead', 'refport', now())",
            world.workspace_id,
            stored,
        )
        normal = quote(ids.normalize(stored), safe="")
        status, done, _ = await call("DELETE", f"{edge}/v1/customers/{normal}", headers=auth(eraser))
        assert status == 202, done
        assert await held(pg, stored) == [], stored
    status, out, _ = await call("DELETE", f"{edge}/v1/customers/%00", headers=auth(eraser))
    assert (status, out["error"]) == (400, "invalid_request"), out


@given(st.text(max_size=40))
def test_the_rule_is_idempotent_and_leaves_nothing_it_refuses(value: str) -> None:
    try:
        once = ids.normalize(value)
    except ids.InvalidId:
        return
    assert ids.normalize(once) == once
    assert once == unicodedata.normalize("NFC", once) and once == once.strip()
    assert not any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") for c in once)


async def test_refstream_erase_normalizes_as_the_routes_do(
    procs: Procs, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys
) -> None:
    token = secrets.token_hex(3)
    # as a route stores it; as earlier versions did (asked for as stored, and as normalized)
    stored = {f"cust-{token}": "v-new", f"old-{token}\u00a0": "v-old", f"\u200bolder-{token}": "v-older"}
    for external_id, visitor in stored.items():
        await pg.execute(
            "INSERT INTO customers (workspace_id, visitor_id, external_id, first_seen_at, last_seen_at)"
            " VALUES ($1, $2, $3, now(), now())",
            world.workspace_id,
            visitor,
            external_id,
        )
    out = await procs.cli("erase", "--customer", f"\u200bcust-{token}\t", "--workspace", world.workspace_id)
    assert out["erasure"]["postgres"]["customers"] == 1 and len(out["also_erased"]) == 1
    out = await procs.cli("erase", "--customer", f"old-{token}\u00a0", "--workspace", world.workspace_id)
    assert out["also_erased"][0]["postgres"]["customers"] == 1
    out = await procs.cli("erase", "--customer", f"older-{token}", "--workspace", world.workspace_id)
    assert out["also_erased"][0]["postgres"]["customers"] == 1
    assert await held(pg, *stored, f"old-{token}", f"older-{token}") == []
    code, _, err = await run_command(
        "erase", "--customer", "", "--workspace", world.workspace_id, env=env_for(procs.settings)
    )
    assert code == 2 and "may not be empty" in err


async def test_a_bricqs_participant_is_one_however_its_id_is_written(edge: str, world: World) -> None:
    token = secrets.token_hex(3)
    key = {"X-API-Key": world.api_key}
    status, first, _ = await call(
        "POST",
        f"{edge}/api/v1/referrals/generate",
        headers=key,
        json={"participant_id": f"\u00a0Bob-{token}", "campaign_id": world.program_id},
    )
    assert (status, first["participant_id"]) == (200, f"Bob-{token}"), first
    status, again, _ = await call(
        "POST",
        f"{edge}/api/v1/referrals/generate",
        headers=key,
        json={"participant_id": f"Bob-{token}\u200b", "campaign_id": world.program_id},
    )
    assert (status, again["code"]) == (200, first["code"])  # the same participant: the same code back
    status, out, _ = await call(
        "GET", f"{edge}/api/v1/referrals/stats/{quote(f'Bob-{token}%09', safe='%')}", headers=key
    )
    assert (status, out.get("participant_id")) == (200, f"Bob-{token}"), out


async def test_an_imported_id_is_normalized_and_erased_through_the_api(
    edge: str, world: World, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, tmp_path: Path
) -> None:
    token = secrets.token_hex(3)
    at = (datetime.now(UTC) - timedelta(days=2)).isoformat()
    rows = [
        {"type": "click", "id": "c1", "timestamp": at, "link": world.link["code"]},
        {"type": "lead", "id": "l1", "timestamp": at, "click": "c1", "customer_id": f"\u00a0Imp-{token}\t"},
        {"type": "sale", "id": "s1", "timestamp": at, "customer_id": f"Imp-{token}\u200b", "amount": 100},
        {"type": "lead", "id": "l2", "timestamp": at, "click": "c1", "customer_id": "a\tb"},
    ]
    path = tmp_path / "history.ndjson"
    path.write_text("\n".join(orjson.dumps(r).decode() for r in rows) + "\n")
    out = await import_cli(settings, path, world, exit_code=3)  # 3: it refused a row, and stored the rest
    assert out["stored"] == 3 and out["refused"] == {"invalid": 1}, out
    assert await pg.fetchval("SELECT link_id FROM sales WHERE customer_external_id = $1", f"Imp-{token}")
    eraser = await erase_key(pg, redis, keys, world, ["erase"])
    status, done, _ = await call("DELETE", f"{edge}/v1/customers/Imp-{token}%C2%A0", headers=auth(eraser))
    assert (status, done["done"]["postgres"]["customers"]) == (202, 1), done
    assert await held(pg, f"Imp-{token}") == []


def _ranges(pred: Any) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for cp in range(0x110000):
        if not 0xD800 <= cp <= 0xDFFF and pred(chr(cp)):
            if out and out[-1][1] == cp - 1:
                out[-1] = (out[-1][0], cp)
            else:
                out.append((cp, cp))
    return tuple(out)


def test_the_documented_pattern_knows_the_characters_the_rule_knows() -> None:
    """/openapi.json's pattern lists Unicode's format and space characters: the Python that
    runs the rule must agree (a newer Unicode adds some: update fields.FORMAT_RANGES)."""
    assert fields.FORMAT_RANGES == _ranges(lambda c: unicodedata.category(c) == "Cf")
    assert fields.SPACE_RANGES == _ranges(str.isspace)


@given(st.text(max_size=24))
def test_the_documented_pattern_says_what_the_rule_takes(value: str) -> None:
    takes = ids.normalized_or_none(value) is not None
    assert takes == bool(re.match(fields.EXTERNAL_ID, value)) or "\x00" in value


@given(st.from_regex(fields.EXTERNAL_ID, fullmatch=True))
def test_what_the_pattern_matches_the_rule_takes(value: str) -> None:
    assert ids.normalized_or_none(value, max_length=max(len(value), 1)) is not None
