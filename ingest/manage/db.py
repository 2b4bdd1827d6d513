"""Schema migration: apply schema.sql, idempotently, under an advisory lock, and record the
schema version it brings the database to.

``SCHEMA_VERSION`` is the version this code needs. Version 1 is the baseline schema.sql
(everything up to and including the ``refstream_schema`` table itself). A change to the
schema appends idempotent statements to schema.sql (``ADD COLUMN IF NOT EXISTS``, ...) and
bumps ``SCHEMA_VERSION`` by one, in the same commit: ``refstream serve`` and
``refstream work`` then refuse a database that ``refstream migrate`` has not brought there
(see ``ingest.manage.schema_check``).

The version lives in ``refstream_schema``, one row, written only by ``migrate`` and only
upwards: an older build migrating a newer database leaves the newer version in place
(its statements are a subset of the newer file's, so nothing is undone either).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

from ingest.manage import online

# 1: the baseline tables; 2: customers' per-field event times and first event
# 3: workspaces.bot_policy (exclude | count) and events.bot_counted
# 4: events and link_visitor_days partitioned by day (a plain table becomes the legacy
#    partition), event_dedupe, event_retention, the management API's indexes
# 5: drop_stats, event_drops, drop_folds, event_flags, affiliate_ips, fraud policy and thresholds
# 6: the link cache's version from a sequence (link_cache_version, cache_version columns and
#    their triggers); the retention's indexes on webhook_deliveries and affiliate_ips
# 7: sales (unique invoice per workspace) and sale_stats; events' index of leads by customer;
#    daily_stats by workspace
# 8: refunds (a row each, the sale's running refunded total), sale_stats' refunds, and
#    commissions' clawbacks
# 9: erasure: the ledger (erasures, erased_ids) and its salt
# 10: do-not-track lists (suppressions)
# 11: the erasure ledger per workspace (erased_ids.workspace_id), erasures.rechecked
# 12: money for the life of the rule: customer_leads (a customer's counted leads, kept past
#     the event retention), commission rules' sale_flat per currency (sale_flats)
# 13: the import's map of the clicks it imported (import_clicks)
# 14: events' indexes only where a read needs them: events_received and events_lead_customer
#     dropped; events_workspace_nonclick and events_workspace_visitor_known (partial) replace
#     events_workspace_type_id and events_workspace_visitor, built online (ingest.manage.online)
# 15: API keys may expire (api_keys.expires_at)
# 16: a click's device and the enrichment's versions once per browser build (event_devices,
#     events.device_id), the row's enrichment only what its address and referrer told;
#     event_enrichment() reads either form
# 17: a flag holds what its event's row does not (event_flags' link_id, type, received_at
#     nullable, written NULL; event_flags_link dropped; click_burst's evidence without the
#     address); what an address tells of its network (AS name, city, region, coordinates)
#     once per network (event_places, events.place_id), event_enrichment(doc, device, place, ...)
# 18: click_burst counted from a window per link and address (click_windows); events_click_ip
#     dropped; a burst's flag on its click's row (events.burst_clicks, burst_seconds) unless
#     the workspace excludes the rule
# 19: events_link_id dropped; a link's events (GET /v1/events?link_id=, the console's tail)
#     by events_link_received, newest first by received time
# 20: a row's User-Agent once per text (event_agents, events.agent_id; user_agent written
#     NULL), event_user_agent() reads either form; a click's payload without its click id
#     and visitor id, event_payload(payload, link, referrer, click, visitor) puts them back;
#     events_workspace_named_click (without a click's own id) replaces events_workspace_click,
#     built online (ingest.manage.online)
# 21: a click_burst window as one byte string of (time, event id) entries (burst_windows),
#     where click_windows held two arrays; click_windows kept for older workers
# 22: the do-not-track lists' changes in commit order (suppression_changes, its trigger,
#     suppression_horizon), read by the edges from their last; suppressions_listing and
#     links_affiliate_created (the lists by page)
# 23: the click_burst rule after the batch's commit: a batch's clicks yet to judge in
#     burst_pending, a flag the workspace does not exclude an event_flags row
# 24: workspaces on several Postgres primaries: the directory's shards, workspace_shards
#     and link_codes (ingest.ledger.placement), read in DATABASE_URL's database only
# 25: a pass's click_burst flags one row per link and day (burst_flags: their event ids in
#     an array, the thresholds once), where 23 and 24 wrote an event_flags row a flag
# 26: a link's events by its 8-byte key: events_link_key_received (uuid_hash_extended(link_id,
#     0), received_at) replaces events_link_received, built online (ingest.manage.online); a
#     click's referrer domain left to its referrer (referrer_domain()), event_enrichment(...,
#     referrer) puts it back
SCHEMA_VERSION = 26

# any constant will do: it only has to be the same for every concurrent `refstream migrate`
_MIGRATE_LOCK = 0x7265_6673_7472  # "refstr"

# the migration's own bookkeeping, not the application's schema: kept beside the code that
# writes it, so schema.sql stays the application's tables only
_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS refstream_schema (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version     integer NOT NULL CHECK (version >= 1),
    migrated_at timestamptz NOT NULL DEFAULT now()
)
"""
# only upwards, and a repeat changes nothing (not even migrated_at)
_RECORD_VERSION = """
INSERT INTO refstream_schema (version) VALUES ($1)
ON CONFLICT (singleton) DO UPDATE SET version = EXCLUDED.version, migrated_at = now()
WHERE refstream_schema.version < EXCLUDED.version
"""


def schema_sql() -> str:
    """schema.sql: packaged in the wheel, or at the repository root in a checkout."""
    packaged = resources.files("refstream").joinpath("schema.sql")
    if packaged.is_file():
        return packaged.read_text()
    return (Path(__file__).resolve().parents[2] / "schema.sql").read_text()


async def migrate(conn: asyncpg.Connection) -> int:
    """Apply schema.sql and record ``SCHEMA_VERSION``, in one transaction under the advisory
    lock (concurrent runs queue; a failed run changes nothing); then, outside it, build the
    indexes schema.sql left to be built online (``ingest.manage.online``: on a database that
    held rows when an index was added; a failed build is taken up again by the next run).
    The recorded version comes back: ``SCHEMA_VERSION``, or a newer one a newer build
    recorded. ``conn`` must not be in a transaction."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATE_LOCK)
        await conn.execute(schema_sql())
        await conn.execute(_VERSION_TABLE)
        await conn.execute(_RECORD_VERSION, SCHEMA_VERSION)
        version: int = await conn.fetchval("SELECT version FROM refstream_schema")
    await online.build(conn)
    return version


async def schema_version(conn: asyncpg.Connection) -> int:
    """The version ``migrate`` recorded; 0 when it never ran (or ran before versions were
    recorded). Must not run inside a transaction: the missing table aborts it."""
    try:
        version: int | None = await conn.fetchval("SELECT version FROM refstream_schema")
    except asyncpg.UndefinedTableError:  # 42P01: never migrated
        return 0
    return version or 0


async def ensure_database(url: str) -> bool:
    """Create the database ``url`` names when it does not exist; True if it was created."""
    try:
        conn = await asyncpg.connect(url)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return False
    name = urlsplit(url).path.lstrip("/")
    server = await asyncpg.connect(url, database="postgres")
    try:
        await server.execute('CREATE DATABASE "{}"'.format(name.replace('"', '""')))
    except asyncpg.DuplicateDatabaseError:
        return False  # created by a concurrent migrate
    finally:
        await server.close()
    return True
