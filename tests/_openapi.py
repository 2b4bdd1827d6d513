"""The operations ``/openapi.json`` lists, collected from the app ``refstream serve`` builds
(each route's entry is declared at its handler): for the tests that walk every documented
route."""

from __future__ import annotations

from ingest.contract.settings import Settings
from ingest.host.app import create_app
from ingest.host.openapi import operations

OPERATIONS = operations(create_app(Settings()))
