"""No personal datum in any log line (docs/privacy.md "Logs"): a real edge and a real worker
(started as the README starts them, every access line and debug line on) take a full flow
with distinctive personal data: a click from an address in a trusted X-Forwarded-For, a
lead (customer id, email, name, metadata), a sale, a Bricqs conversion, a management read
with the email in its query; requests refused (a bad id, a bad key, no such route); a
request that fails (a database error whose message quotes the participant's id: a 500);
an entry the worker cannot store (its error quotes the customer); and erasures through
the API and the CLI. Every line every process wrote (stdout and stderr) is searched for
each value in every spelling a line could carry it (``tests/_logscan.py``)."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any
from urllib.parse import quote

import aiohttp
import asyncpg

from ._logscan import find_crashes, find_personal
from ._procs import Procs, env_for, run_command
from ._world import World, call
from .conftest import wait_for
from .test_erasure import erase_key
from .test_sales import sale_body
from .test_seed_002_affitor import EXAMPLE as CLICK
from .test_seed_004_refport import lead_body

TRIGGERS = """
CREATE OR REPLACE FUNCTION pytest_refuse_participant() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.external_id = '{participant}' THEN
        RAISE EXCEPTION 'participant % refused', NEW.external_id;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER pytest_refuse_participant BEFORE INSERT ON affiliates
    FOR EACH ROW EXECUTE FUNCTION pytest_refuse_participant();
CREATE OR REPLACE FUNCTION pytest_refuse_customer() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.customer_external_id = '{poison}' THEN
        RAISE EXCEPTION 'customer % (%) refused', NEW.customer_external_id, NEW.payload->>'email';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER pytest_refuse_customer BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION pytest_refuse_customer();
"""
# in one transaction, the tables locked first in the order a worker's batch takes them
# (events, then affiliates): a DROP TRIGGER alone locks the trigger before its table, and
# the worker, still retrying the poison entry, held the table and waited on the trigger
UNTRIGGER = """
BEGIN;
LOCK TABLE events IN ACCESS EXCLUSIVE MODE;
LOCK TABLE affiliates IN ACCESS EXCLUSIVE MODE;
DROP TRIGGER IF EXISTS pytest_refuse_participant ON affiliates;
DROP TRIGGER IF EXISTS pytest_refuse_customer ON events;
COMMIT;
"""


class People:
    def __init__(self) -> None:
        t = secrets.token_hex(4)
        self.customer = f"Zelda-{t}-cust"
        self.email = f"zelda.{t}@privacy.example"
        self.name = f"Zelda Q{t} Person"
        self.ip = f"203.0.113.{secrets.randbelow(200) + 20}"
        self.meta = f"meta-secret-{t}"
        self.session = f"sess-secret-{t}"
        self.participant = f"Partic-{t}-ipant"
        self.poison = f"Poison-{t}-cust"
        self.poison_email = f"poison.{t}@privacy.example"

    @property
    def values(self) -> list[str]:
        return [
            self.customer,
            self.email,
            self.name,
            self.ip,
            self.meta,
            self.session,
            self.participant,
            self.poison,
            self.poison_email,
        ]


def logs_of(procs: Procs) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(procs.logdir.glob("*.log")))


async def test_no_personal_datum_reaches_any_log_line(
    procs: Procs, world: World, pg: asyncpg.Pool, redis: Any, keys: Any
) -> None:
    p = People()
    await pg.execute(TRIGGERS.format(participant=p.participant, poison=p.poison))
    triggered = True
    env = {
        "REFSTREAM_LOG_LEVEL": "debug",
        "REFSTREAM_ACCESS_LOG": "all",
        "REFSTREAM_TRUSTED_PROXIES": "127.0.0.0/8",
        "REFSTREAM_ERASE_SWEEP_EVERY_S": "1",
    }
    edge = await procs.start_edge(**env)
    procs.start("work", **env)
    key = {"Authorization": f"Bearer {world.api_key}"}
    fwd = {"X-Forwarded-For": p.ip}
    cli_err = ""
    try:
        status, out, _ = await call(
            "POST",
            f"{edge}/api/v1/track/click",
            headers=fwd,
            json={**CLICK, "session_id": p.session, "page_url": f"https://x.example/?e={p.email}"},
        )
        assert status == 200, out
        lead = lead_body(
            out["click_id"],
            customerExternalId=p.customer,
            customerEmail=p.email,
            customerName=p.name,
            metadata={"note": p.meta},
        )
        status, out, _ = await call("POST", f"{edge}/api/track/lead", json=lead, headers={**key, **fwd})
        assert status == 200, out
        sale = sale_body(customerExternalId=p.customer, invoiceId=f"in-{p.meta}", metadata={"note": p.meta})
        status, out, _ = await call("POST", f"{edge}/api/track/sale", json=sale, headers={**key, **fwd})
        assert status == 200, out
        status, out, _ = await call(
            "POST",
            f"{edge}/api/v1/referrals/convert",
            headers=fwd,
            json={"code": "PARTNER123", "referred_session_id": p.session},
        )
        assert status == 200, out
        await wait_for(
            lambda: pg.fetchval("SELECT count(*) FROM customers WHERE external_id = $1", p.customer),
            what="the lead stored",
        )
        status, out, _ = await call(
            "GET", f"{edge}/v1/customers/{quote(p.customer)}?email={quote(p.email)}", headers={**key, **fwd}
        )
        assert (status, out["email"]) == (200, p.email), out

        # refused: an id the rule refuses, a key that is no key, a route that is not there
        bad = lead_body(lead["clickId"], customerExternalId=f"{p.customer}\tx", customerEmail=p.email)
        status, out, _ = await call("POST", f"{edge}/api/track/lead", json=bad, headers={**key, **fwd})
        assert status == 400, out
        status, _, _ = await call(
            "GET",
            f"{edge}/v1/customers/{quote(p.customer)}?ip={p.ip}",
            headers={"Authorization": f"Bearer {p.email}", **fwd},
        )
        assert status == 401
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{edge}/nowhere/{quote(p.customer)}?email={quote(p.email)}", headers=fwd) as r:
                assert r.status == 404

        # refused before any route: a request aiohttp cannot parse (its message quotes the bytes)
        assert (
            await _raw(edge, f"GET /v1/customers/{p.customer} HTTP/1.1\r\nHost: x\r\nX-Note: {p.email}\x01\r\n\r\n")
        ).split(b" ")[1] == b"400"

        # failing: the database refuses the participant with a message that quotes it
        status, out, _ = await call(
            "POST",
            f"{edge}/api/v1/referrals/generate",
            json={"participant_id": p.participant, "campaign_id": world.program_id},
            headers={"X-API-Key": world.api_key, **fwd},
        )
        assert status == 500, out

        # an entry the worker cannot store, for a reason that quotes the customer and their email
        poison = lead_body(lead["clickId"], customerExternalId=p.poison, customerEmail=p.poison_email)
        status, out, _ = await call("POST", f"{edge}/api/track/lead", json=poison, headers={**key, **fwd})
        assert status == 200, out
        refused = ("event.poison", "batch.worker_error")
        await wait_for(lambda: _said(procs, *refused), timeout=60, what="the worker's refusal")
        await pg.execute(UNTRIGGER)
        triggered = False

        # the erasures: through the API, and through the CLI
        eraser = await erase_key(pg, redis, keys, world, ["erase"])
        status, out, _ = await call(
            "DELETE", f"{edge}/v1/customers/{quote(p.customer)}", headers={"Authorization": f"Bearer {eraser}", **fwd}
        )
        assert status == 202, out
        code, _, cli_err = await run_command(
            "erase",
            "--customer",
            p.poison,
            "--workspace",
            world.workspace_id,
            env=env_for(procs.settings, REFSTREAM_LOG_LEVEL="debug"),
        )
        assert code == 0, cli_err
        await wait_for(
            lambda: pg.fetchval("SELECT bool_and(redis_at IS NOT NULL) FROM erasures"),
            timeout=60,
            what="the workers' sweep",
        )
    finally:
        if triggered:  # a DROP TRIGGER locks its table: once, not again beside a worker's batch (a deadlock)
            await pg.execute(UNTRIGGER)
        procs.stop_all()  # their buffered lines written out
    text = logs_of(procs) + "\n" + cli_err
    assert "request.failed" in text and p.customer not in cli_err  # the test can fail: it saw the failure
    assert find_personal(text, p.values) == []
    crashes = find_crashes(text)
    assert len(crashes) == 1 and "request.failed" in crashes[0], crashes  # the 500 provoked above, and only it


async def _said(procs: Procs, *events: str) -> bool:
    text = logs_of(procs)
    return any(f'"event":"{e}"' in text for e in events)


async def _raw(base: str, request: str) -> bytes:
    """One request as raw bytes (one no HTTP client would send); the answer's first bytes."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request.encode())
        await writer.drain()
        return await asyncio.wait_for(reader.read(200), 10)
    finally:
        writer.close()
