"""The worker's insert of a batch's events, in three forms on the same rows: one jsonb
document of the rows, parsed in Postgres field by field (``jsonrows``: the worker's form,
``workers.consumer.store``), against one array per column, ``INSERT … SELECT * FROM
unnest($1::uuid[], …)``, in asyncpg's binary format (uuid, inet and jsonb columns as text
arrays cast in Postgres: as uuid and inet objects asyncpg's own encoding cost more), and
against a binary COPY (``copy_records_to_table``) into a session's temporary table of the
events' columns, then one ``INSERT … SELECT`` from it (COPY itself cannot skip a conflict).
``python -m bench.insert_forms [--rows 500] [--rounds 40]``.

Each round inserts the same batch of part (cap)'s bio.re clicks (enrichment and payload as
the worker writes them) in each form, alternately, each in a transaction rolled back, into
a fresh database migrated to the current schema (dropped after), on uvloop as the worker
runs. Measured per row: the Postgres backend's CPU (utime + stime from ``/proc/<pid>/stat``:
the server must be local) and this process's (encoding the parameter, asyncpg's send and
receive). The figure to read
is each form's ratio to the document's, each round's forms measured side by side.
"""

from __future__ import annotations

import argparse
import os
import resource
import secrets
import statistics
import uuid
from datetime import UTC, datetime

import asyncpg
import orjson
import uvloop

from ingest.contract import jsonrows
from ingest.contract.events import Dialect, uuid7
from ingest.manage.db import ensure_database, migrate
from refstream.services import with_database
from workers.consumer import event_row, store
from workers.consumer.event_row import EventRow

from .world import REFERRER, UAS, client_ip

_AS_TEXT = frozenset({"jsonb", "uuid", "inet"})
_ARRAYS_FORM = f"""
INSERT INTO events ({", ".join(name for name, _ in event_row.COLUMNS)})
SELECT * FROM unnest({
    ", ".join(
        f"${i}::text[]::{t}[]" if t in _AS_TEXT else f"${i}::{t}[]" for i, (_, t) in enumerate(event_row.COLUMNS, 1)
    )
})
ORDER BY 1
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id, (event_id < (SELECT horizon_id FROM event_retention)) IS TRUE AS expired
"""
_TEXT_AT = tuple(i for i, (_, t) in enumerate(event_row.COLUMNS) if t in ("jsonb", "uuid"))
# the COPY form: the batch into a session's temporary table of the events' columns (binary
# COPY, asyncpg encoding each value), then one INSERT … SELECT from it
_STAGE = "CREATE TEMP TABLE IF NOT EXISTS batch_events (LIKE events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
_COPY_FORM = f"""
INSERT INTO events ({", ".join(name for name, _ in event_row.COLUMNS)})
SELECT {", ".join(name for name, _ in event_row.COLUMNS)} FROM batch_events
ORDER BY 1
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id, (event_id < (SELECT horizon_id FROM event_retention)) IS TRUE AS expired
"""
_JSON_AT = tuple(i for i, (_, t) in enumerate(event_row.COLUMNS) if t == "jsonb")
_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def rows(n: int) -> list[EventRow]:
    """``n`` bio.re clicks as the worker builds them (a Chrome click's enrichment, a device id)."""
    ws, link, program, affiliate = (str(uuid.uuid4()) for _ in range(4))
    now = datetime.now(UTC)
    out = []
    for i in range(n):
        event_id = uuid7(int(now.timestamp() * 1000) + i)
        out.append(
            EventRow(
                event_id=event_id,
                type=1,
                workspace_id=ws,
                link_id=link,
                program_id=program,
                affiliate_id=affiliate,
                click_id=event_id,
                visitor_id=None,
                customer_external_id=None,
                name=None,
                dedupe_key=None,
                dialect=Dialect.BIORE,
                test_mode=False,
                is_bot=False,
                received_at=now,
                ip=client_ip(i),
                user_agent=UAS[i % len(UAS)],
                referrer=REFERRER,
                country="DE",
                asn=3320,
                enrichment={"referrer_domain": "bio.re"},
                visitor_key=f"ipua:{secrets.token_hex(8)}",
                out_of_window=False,
                payload={"code": "c1", "referrer": REFERRER},
                bot_counted=False,
                device_id=1,
                place_id=None,
                agent_id=None,
            )
        )
    return out


def _columns(batch: list[EventRow]) -> list[list[object]]:
    """One list per column; uuids and documents as text (orjson's, as ``jsonrows`` writes them)."""
    out: list[list[object]] = [list(c) for c in zip(*batch, strict=True)]
    for i in _TEXT_AT:
        out[i] = [v if v is None or isinstance(v, str) else _text(v) for v in out[i]]
    return out


_NAMES = [name for name, _ in event_row.COLUMNS]


def _copied(row: EventRow) -> tuple[object, ...]:
    """A row as asyncpg's COPY encodes it: documents as their JSON text."""
    out = list(row)
    for i in _JSON_AT:
        if out[i] is not None:
            out[i] = orjson.dumps(out[i]).decode()
    return tuple(out)


def _text(v: object) -> str:
    return str(v) if isinstance(v, uuid.UUID) else orjson.dumps(v).decode()


def backend_cpu_s(pid: int) -> float:
    """A local Postgres backend's CPU seconds so far (utime + stime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * _TICK_S


def own_cpu_s() -> float:
    """This process's CPU seconds so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _insert(conn: asyncpg.Connection, form: str, batch: list[EventRow]) -> int:
    async with conn.transaction():
        if form == "json":
            got = await conn.fetch(store._INSERT_EVENTS, jsonrows.doc(event_row.plain(batch)))
        elif form == "copy":
            records = [_copied(r) for r in batch]
            await conn.copy_records_to_table("batch_events", records=records, columns=_NAMES)
            got = await conn.fetch(_COPY_FORM)
        else:
            got = await conn.fetch(_ARRAYS_FORM, *_columns(batch))
        raise _Rollback(len(got))


FORMS = ("json", "arrays", "copy")


class _Rollback(Exception):
    def __init__(self, n: int) -> None:
        self.n = n


async def measure(url: str, n: int, rounds: int) -> dict[str, dict[str, float]]:
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        batch = rows(n)
        await conn.execute(_STAGE)
        per: dict[str, dict[str, list[float]]] = {f: {"pg": [], "py": []} for f in FORMS}
        for r in range(rounds + 2):  # two rounds of warm-up: plans cached, pages in memory
            for form in FORMS if r % 2 else FORMS[::-1]:
                pg0, py0 = backend_cpu_s(pid), own_cpu_s()
                for _ in range(5):
                    try:
                        await _insert(conn, form, batch)
                    except _Rollback as done:
                        assert done.n == n, (form, done.n)
                pg1, py1 = backend_cpu_s(pid), own_cpu_s()
                if r >= 2:
                    per[form]["pg"].append((pg1 - pg0) / (5 * n) * 1e6)
                    per[form]["py"].append((py1 - py0) / (5 * n) * 1e6)
        return {f: {k: statistics.median(v) for k, v in d.items()} for f, d in per.items()}
    finally:
        await conn.close()


async def main(n: int, rounds: int) -> None:
    server = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"refstream_insert_forms_{secrets.token_hex(4)}"
    url = with_database(server, name)
    await ensure_database(url)
    try:
        got = await measure(url, n, rounds)
    finally:
        admin = await asyncpg.connect(server)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
    j = got["json"]
    print(f"{n} rows a batch, {rounds} rounds, medians of µs per row (CPU), each form against the jsonb document:")
    for who, k in (("Postgres backend", "pg"), ("this process    ", "py")):
        print(
            f"  {who}: jsonb document {j[k]:.2f}, "
            + ", ".join(f"{f} {got[f][k]:.2f} (×{got[f][k] / j[k]:.2f})" for f in FORMS[1:])
        )


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=500)
    p.add_argument("--rounds", type=int, default=40)
    args = p.parse_args()
    uvloop.run(main(args.rows, args.rounds))


if __name__ == "__main__":
    cli()
