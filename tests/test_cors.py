"""A browser may send what the documents tell it to. The preflight of
``/api/v1/referral/click/{code}`` allowed ``Content-Type`` alone, so a browser's fetch with
the documented ``Idempotency-Key`` failed before it was sent. Held here to the OpenAPI
document the running edge serves: for every path ``ingest.host.cors`` calls public, each
header the document names for it (its parameters and its security schemes' headers),
``Content-Type`` and ``X-Request-ID`` (echoed) are allowed by its preflight, and its
methods too; so a header documented later cannot be forgotten. A preflight that asks for
other headers is answered with them allowed."""

from __future__ import annotations

import re
from typing import Any

from ingest.host import cors

from ._world import call

ASKED = {"Origin": "https://shop.example"}


def _listed(value: str) -> set[str]:
    return {h.strip().lower() for h in value.split(",") if h.strip()}


def _documented_headers(spec: dict[str, Any], ops: dict[str, Any]) -> set[str]:
    schemes = spec["components"]["securitySchemes"]
    names = {"content-type", "x-request-id"}
    for op in ops.values():
        names |= {p["name"].lower() for p in op.get("parameters", []) if p["in"] == "header"}
        for requirement in op.get("security", []):
            for scheme in (schemes[name] for name in requirement):
                if scheme["type"] == "http":
                    names.add("authorization")
                elif scheme["type"] == "apiKey" and scheme["in"] == "header":
                    names.add(scheme["name"].lower())
    return names


async def test_every_documented_header_of_a_public_route_is_allowed_by_its_preflight(edge: str):
    status, spec, _ = await call("GET", f"{edge}/openapi.json")
    assert status == 200
    checked = []
    for path, ops in spec["paths"].items():
        sample = re.sub(r"\{[^}]+\}", "sample", path)
        if not cors.is_public(sample):
            continue
        for method in ops:
            status, _, headers = await call(
                "OPTIONS", edge + sample, headers={**ASKED, "Access-Control-Request-Method": method.upper()}
            )
            assert status == 204, path
            missing = _documented_headers(spec, ops) - _listed(headers["Access-Control-Allow-Headers"])
            assert not missing, (path, missing)
            assert {m.lower() for m in ops} <= _listed(headers["Access-Control-Allow-Methods"]), path
        checked.append(path)
    # the routes a browser calls with a body and the documented key, at least
    assert {"/api/v1/referral/click/{code}", "/api/v1/track/click", "/api/v1/referrals/convert"} <= set(checked)


async def test_a_preflight_that_asks_for_headers_is_answered_with_them_allowed(edge: str):
    url = f"{edge}/api/v1/referral/click/sample"
    asked = "content-type, idempotency-key, X-Custom-Trace, authorization, sentry-trace"
    status, _, headers = await call(
        "OPTIONS",
        url,
        headers={**ASKED, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": asked},
    )
    assert status == 204
    assert _listed(asked) <= _listed(headers["Access-Control-Allow-Headers"])
    assert "access-control-request-headers" in _listed(headers["Vary"])  # the answer follows what was asked
    # a name no header can have is not echoed
    bad = "x-ok, bad name, x\u00e9"
    status, _, headers = await call(
        "OPTIONS",
        url,
        headers={**ASKED, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": bad},
    )
    assert status == 204 and "x-ok" in _listed(headers["Access-Control-Allow-Headers"])
    assert not {"bad name", "x\u00e9"} & _listed(headers["Access-Control-Allow-Headers"])


async def test_dubs_browser_click_is_public_with_its_publishable_key_allowed(edge: str):
    """Dub's ``POST /track/click`` is called from browsers with ``Content-Type`` and
    ``Authorization`` (Dub's publishable key): its preflight allows both."""
    assert cors.is_public("/track/click")
    status, _, headers = await call(
        "OPTIONS",
        f"{edge}/track/click",
        headers={
            **ASKED,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "*"
    assert {"authorization", "content-type"} <= _listed(headers["Access-Control-Allow-Headers"])
    assert "post" in _listed(headers["Access-Control-Allow-Methods"])
