"""Dub's official SDKs, as their users install them (PyPI ``dub``, npm ``dub``), unchanged,
against a running edge and worker: ``track.lead`` and ``track.sale`` on Dub's paths
(``server_url`` the edge) and on Refport's (``server_url`` the edge's ``/api``). A first
call, a repeat, an unknown click (the SDK's typed error), a 429 (parsed), a sale in a
zero-decimal currency; then Postgres holds each lead and sale once."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from ._procs import Procs
from ._world import BROWSER, call

SDK_DIR = Path(__file__).parent / "sdk"
UNKNOWN_CLICK = "clk_" + "0" * 32  # refstream's form, no click's: neither pending nor known
RATE_LIMIT = 15  # a key's requests a minute on the edge these tests start


def _normal_py(fn: Any) -> dict[str, Any]:
    """One call of the Python SDK, as the tests compare it: what it parsed (by Dub's field
    names) or the error it raised (its class, the status, Dub's code)."""
    try:
        value = fn()
    except Exception as exc:  # whatever the SDK raises is the result
        data = getattr(exc, "data", None)
        code = getattr(getattr(data, "error", None), "code", None)
        return {
            "ok": False,
            "error": type(exc).__name__,
            "status": getattr(getattr(exc, "raw_response", None), "status_code", None),
            "code": getattr(code, "value", code),
            "message": str(exc)[:500],
        }
    return {"ok": True, "value": value.model_dump(by_alias=True, mode="json")}


def run_python(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from dub import Dub  # PyPI dub, the test extra's

    snake = {
        "clickId": "click_id",
        "eventName": "event_name",
        "customerExternalId": "customer_external_id",
        "customerName": "customer_name",
        "customerEmail": "customer_email",
        "paymentProcessor": "payment_processor",
        "invoiceId": "invoice_id",
    }
    out = []
    for c in calls:
        sdk = Dub(token=c["token"], server_url=c["server"])
        body: Any = {snake.get(k, k): v for k, v in c["body"].items()}  # the SDK's TypedDict
        track = sdk.track.lead if c["op"] == "lead" else sdk.track.sale
        out.append(_normal_py(lambda: track(request=body)))  # noqa: B023 (called at once)
    return out


def run_node(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    done = subprocess.run(
        ["node", str(SDK_DIR / "dub_calls.mjs")],
        input=orjson.dumps({"calls": calls}),
        capture_output=True,
        timeout=120,
        check=True,
    )
    results: list[dict[str, Any]] = orjson.loads(done.stdout)
    return results


@pytest.fixture(scope="session")
def node_sdk() -> None:
    """npm ``dub`` as package.json pins it, from the machine's configured registry (once)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("no node/npm on this machine: Dub's TypeScript SDK is not tested")
    if not (SDK_DIR / "node_modules" / "dub" / "package.json").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=SDK_DIR, check=True, timeout=300)


async def _stack(procs: Procs) -> dict[str, Any]:
    ws = await procs.cli("workspace", "create", "Acme")
    wid = ws["workspace_id"]
    await procs.cli("link", "create", "--workspace", wid, "--code", "sdk-link", "--url", "https://shop.example.com/p")
    spare = await procs.cli("keys", "create", "--workspace", wid, "--scopes", "track")
    base = await procs.start_edge(REFSTREAM_KEY_RATE_LIMIT_PER_MIN=str(RATE_LIMIT))
    return {"base": base, "key": ws["api_key"], "limited": spare["api_key"]}


async def _click(base: str, agent: str) -> str:
    status, out, _ = await call(
        "POST",
        f"{base}/track/click",
        json={"domain": "shop.example.com", "key": "sdk-link"},
        headers={"User-Agent": agent},
    )
    assert status == 200, out
    click_id: str = out["clickId"]
    return click_id


async def _exhaust(base: str, key: str) -> None:
    """Spend ``key``'s minute: requests until the edge answers 429."""
    for _ in range(RATE_LIMIT * 4):
        status, _, _ = await call("POST", f"{base}/track/lead", json={}, headers={"Authorization": f"Bearer {key}"})
        if status == 429:
            return
    raise AssertionError("the key's rate limit never answered 429")


def _calls(stack: dict[str, Any], server: str, who: str, click_id: str) -> list[dict[str, Any]]:
    lead = {
        "clickId": click_id,
        "eventName": "Sign up",
        "customerExternalId": who,
        "customerEmail": f"{who}@example.com",
    }
    sale = {
        "customerExternalId": who,
        "amount": 5000,
        "currency": "JPY",
        "paymentProcessor": "stripe",
        "invoiceId": f"inv-{who}",
    }
    unknown = {**lead, "clickId": UNKNOWN_CLICK}
    key = stack["key"]
    return [
        {"server": server, "token": key, "op": "lead", "body": lead},
        {"server": server, "token": key, "op": "lead", "body": lead},
        {"server": server, "token": key, "op": "lead", "body": unknown},
        {"server": server, "token": key, "op": "sale", "body": sale},
        {"server": server, "token": key, "op": "sale", "body": sale},
    ]


def _limited(stack: dict[str, Any], server: str, who: str) -> list[dict[str, Any]]:
    lead = {"clickId": UNKNOWN_CLICK, "eventName": "Sign up", "customerExternalId": who}
    sale = {"customerExternalId": who, "amount": 100}
    return [
        {"server": server, "token": stack["limited"], "op": "lead", "body": lead},
        {"server": server, "token": stack["limited"], "op": "sale", "body": sale},
    ]


def _judge(results: list[dict[str, Any]], base: str, server: str, who: str, click_id: str) -> None:
    first, again, unknown, sold, sold_again = results
    assert first["ok"], first
    assert first["value"]["click"] == {"id": click_id}
    link = first["value"]["link"]
    assert (link["key"], link["url"], link["shortLink"]) == (
        "sdk-link",
        "https://shop.example.com/p",
        f"{base}/r/sdk-link",
    )
    assert first["value"]["customer"]["externalId"] == who
    assert again == first  # a repeat: the same answer, counted once (below)
    if server == base:  # Dub's paths: Dub's 404 for a click it does not know
        assert (unknown["ok"], unknown["error"], unknown["status"], unknown["code"]) == (
            False,
            "NotFound",
            404,
            "not_found",
        )
    else:  # Refport's: its 400, in the code Dub's SDK parses
        assert (unknown["ok"], unknown["error"], unknown["status"], unknown["code"]) == (
            False,
            "BadRequest",
            400,
            "bad_request",
        )
        assert "INVALID_CLICK_ID" in unknown["message"]
    assert sold["ok"], sold
    assert sold["value"]["sale"]["amount"] == 5000 and sold["value"]["sale"]["currency"] == "jpy"
    assert sold["value"]["customer"]["externalId"] == who and sold["value"]["customer"]["id"] == who
    assert sold_again == sold


async def _scenario(procs: Procs, pg: asyncpg.Pool, sdk: str, run: Any) -> None:
    stack = await _stack(procs)
    base = stack["base"]
    servers = {"dub": base, "refport": f"{base}/api"}
    clicks = {name: await _click(base, f"{BROWSER} {sdk}-{name}") for name in servers}
    calls = [c for name, server in servers.items() for c in _calls(stack, server, f"{sdk}-{name}", clicks[name])]
    calls += [c for name, server in servers.items() for c in _limited(stack, server, f"{sdk}-{name}-limited")]
    await _exhaust(base, stack["limited"])
    results = await asyncio.to_thread(run, calls)
    for i, (name, server) in enumerate(servers.items()):
        _judge(results[i * 5 : i * 5 + 5], base, server, f"{sdk}-{name}", clicks[name])
    for limited in results[10:]:
        assert (limited["ok"], limited["error"], limited["status"], limited["code"]) == (
            False,
            "RateLimitExceeded",
            429,
            "rate_limit_exceeded",
        ), limited

    # Refport's own clients (not Dub's SDK) still get Refport's codes
    status, out, _ = await call(
        "POST",
        f"{base}/api/track/lead",
        headers={"Authorization": f"Bearer {stack['key']}"},
        json={"clickId": UNKNOWN_CLICK, "eventName": "Sign up", "customerExternalId": "x"},
    )
    assert (status, out["error"]["code"]) == (400, "INVALID_CLICK_ID")

    await procs.cli("work", "--drain")
    for name in servers:
        who = f"{sdk}-{name}"
        leads = await pg.fetchval("SELECT count(*) FROM events WHERE type = 2 AND customer_external_id = $1", who)
        sales = await pg.fetch("SELECT amount, currency FROM sales WHERE customer_external_id = $1", who)
        assert leads == 1 and [tuple(s) for s in sales] == [(5000, "jpy")], (who, leads, sales)
    assert await pg.fetchval("SELECT leads FROM links WHERE code = 'sdk-link'") == 2


async def test_the_python_sdk_on_dub_and_refport_paths(procs: Procs, pg: asyncpg.Pool) -> None:
    pytest.importorskip("dub", reason="PyPI dub is in the test extra: pip install -e .[test]")
    await _scenario(procs, pg, "py", run_python)


async def test_the_typescript_sdk_on_dub_and_refport_paths(procs: Procs, pg: asyncpg.Pool, node_sdk: None) -> None:
    await _scenario(procs, pg, "ts", run_node)
