"""A visitor id that is a placeholder (``undefined``, ``null``, ...: what a careless tracker
sends when it holds no id) is no one's: two people who send it are two customers, and the
erasure of one leaves the other. Affixo's click and the batch's mint a visitor as for none
sent; the import stores its click as one of no visitor id; Bricqs refuses it as a session."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import asyncpg

from ingest.contract import ids
from ingest.contract.settings import Settings

from ._procs import env_for, run_command
from ._world import World, call
from .test_seed_004_refport import lead_body


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
