"""The host's own routes in ``/openapi.json``: operations (health, this document, metrics) and
the browser's (the plain page, the tracker script, redirect links).
"""

from __future__ import annotations

from ingest.host import health
from ingest.host.openapi.common import Op

OPERATIONS: tuple[Op, ...] = (
    Op("get", "/healthz", "The process is up", "Operations", {200: health.Health}),
    Op("get", "/readyz", "Redis and Postgres answer", "Operations", {200: health.Ready, 503: health.Ready}),
    Op("get", "/openapi.json", "This document", "Operations", {200: None}),
    Op("get", "/metrics", "Prometheus metrics (text exposition format)", "Operations", {200: None}),
    Op("get", "/", "A plain page (the default fallback of redirect links)", "Browser", {200: None}),
    Op("get", "/tracker.js", "The tracker script a site owner pastes", "Browser", {200: None, 304: None}),
    Op(
        "get",
        "/r/{code}",
        "Redirect link: records the click, sets the cookie, 302 to the destination with the "
        "click id; unknown codes 302 to the fallback URL",
        "Browser",
        {302: None},
    ),
)
