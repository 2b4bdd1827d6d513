-- refstream schema. `refstream migrate` applies this whole file in one transaction under
-- an advisory lock; every statement is idempotent, and later changes are appended as
-- idempotent statements too (ADD COLUMN IF NOT EXISTS, CREATE INDEX IF NOT EXISTS, ...).

CREATE TABLE IF NOT EXISTS workspaces (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name            text NOT NULL,
    -- how much of a visitor's IP address is stored: full, truncated (/24, /48) or none
    ip_policy       text NOT NULL DEFAULT 'full' CHECK (ip_policy IN ('full', 'truncated', 'none')),
    allowed_origins text[] NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS programs (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    workspace_id       uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    name               text NOT NULL,
    url                text,
    cookie_window_days integer NOT NULL DEFAULT 30 CHECK (cookie_window_days BETWEEN 1 AND 3650),
    attribution        text NOT NULL DEFAULT 'last_click' CHECK (attribution IN ('first_click', 'last_click')),
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS programs_workspace ON programs (workspace_id);

-- an affiliate is a partner of a program (seed 001 calls it a participant of a campaign)
CREATE TABLE IF NOT EXISTS affiliates (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    workspace_id uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    program_id   uuid NOT NULL REFERENCES programs (id) ON DELETE CASCADE,
    external_id  text NOT NULL,
    name         text,
    email        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (program_id, external_id)
);

CREATE TABLE IF NOT EXISTS api_keys (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    workspace_id uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    affiliate_id uuid REFERENCES affiliates (id) ON DELETE CASCADE,
    kind         text NOT NULL CHECK (kind IN ('workspace', 'affiliate')),
    -- sha256 of the whole key; the key itself is shown once and never stored
    key_hash     bytea NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    -- the first characters of the key, to recognise it in listings and revoke it
    prefix       text NOT NULL UNIQUE,
    scopes       text[] NOT NULL DEFAULT '{}',
    name         text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz,
    CHECK ((kind = 'affiliate') = (affiliate_id IS NOT NULL))
);

CREATE TABLE IF NOT EXISTS links (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    workspace_id    uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    -- a link whose program or affiliate is gone is "misconfigured": clicks on it are refused
    program_id      uuid REFERENCES programs (id) ON DELETE SET NULL,
    affiliate_id    uuid REFERENCES affiliates (id) ON DELETE SET NULL,
    code            text NOT NULL UNIQUE,
    url             text NOT NULL,
    domain          text,
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'inactive')),
    clicks          bigint NOT NULL DEFAULT 0,
    unique_clicks   bigint NOT NULL DEFAULT 0,
    bot_clicks      bigint NOT NULL DEFAULT 0,
    leads           bigint NOT NULL DEFAULT 0,
    conversions     bigint NOT NULL DEFAULT 0,
    last_clicked_at timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS links_affiliate ON links (affiliate_id);
CREATE INDEX IF NOT EXISTS links_workspace ON links (workspace_id);

-- a visitor who arrived through a link, keyed by the visitor id the edge resolved (a click
-- id, a tracker's visitor id, a referred session); status only moves forward:
-- 1 click < 2 lead < 3 converted, whatever order the events are processed in
CREATE TABLE IF NOT EXISTS customers (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    workspace_id   uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    link_id        uuid REFERENCES links (id) ON DELETE SET NULL,
    affiliate_id   uuid REFERENCES affiliates (id) ON DELETE SET NULL,
    program_id     uuid REFERENCES programs (id) ON DELETE SET NULL,
    external_id    text,
    visitor_id     text NOT NULL,
    email          text,
    name           text,
    avatar_url     text,
    status         smallint NOT NULL DEFAULT 1 CHECK (status IN (1, 2, 3)),
    first_click_id uuid,
    first_seen_at  timestamptz NOT NULL,
    last_seen_at   timestamptz NOT NULL,
    test_mode      boolean NOT NULL DEFAULT false
);
CREATE UNIQUE INDEX IF NOT EXISTS customers_visitor ON customers (workspace_id, visitor_id);
CREATE INDEX IF NOT EXISTS customers_external
    ON customers (workspace_id, external_id) WHERE external_id IS NOT NULL;

-- one row per click, lead or conversion. The primary key is the edge-minted UUIDv7, so a
-- redelivered or replayed entry is a no-op (ON CONFLICT DO NOTHING), and ids sort by time:
-- the table is range-partitioned on it, one partition per UTC day (bounds are the UUIDs of
-- the day's first millisecond, xxxxxxxx-xxxx-7000-8000-000000000000), created ahead and
-- dropped after REFSTREAM_EVENT_RETENTION_DAYS days by the worker (workers/consumer/partitions.py), with a
-- default partition for anything outside them. No foreign keys on this hot table: the
-- worker resolves links itself and a per-row FK check would cost every insert.
CREATE TABLE IF NOT EXISTS events (
    event_id      uuid PRIMARY KEY,
    type          smallint NOT NULL CHECK (type IN (1, 2, 3)),
    workspace_id  uuid NOT NULL,
    link_id       uuid,
    program_id    uuid,
    affiliate_id  uuid,
    click_id      uuid,          -- the click this event belongs to (a lead's, or a click's own)
    visitor_id    text,          -- the customer key
    visitor_key   text,          -- who, for unique clicks: the visitor id, or a hash of IP and UA
    customer_external_id text,
    name          text,          -- a lead's or conversion's event name
    -- idempotency beyond the event id: a lead per (customer, event name), a conversion per
    -- (code, referred session); a second one is a no-op like a redelivery
    dedupe_key    text,
    dialect       text NOT NULL,
    test_mode     boolean NOT NULL DEFAULT false,
    -- a lead or conversion whose click is older than the program's cookie window: stored, not credited
    out_of_window boolean NOT NULL DEFAULT false,
    is_bot        boolean NOT NULL DEFAULT false,
    received_at   timestamptz NOT NULL,
    processed_at  timestamptz NOT NULL DEFAULT now(),
    ip            inet,
    user_agent    text,
    referrer      text,
    country       text,
    asn           integer,
    -- geo (city, region, coordinates, AS name), device (browser, OS, type, brand, model),
    -- bot reason, referrer domain, and the data and parser versions that produced them
    enrichment    jsonb,
    payload       jsonb NOT NULL DEFAULT '{}'
) PARTITION BY RANGE (event_id);
-- reconcile's and the drops' recount: a chunk of links' events in a window of received time
-- (until schema 26: `events_link_key_received` replaces it, and none is made once it is there)
DO $link_received$
BEGIN
    IF to_regclass('events_link_key_received') IS NULL THEN
        CREATE INDEX IF NOT EXISTS events_link_received ON events (link_id, received_at);
    END IF;
END
$link_received$;
-- (the dedupe keys live in event_dedupe, below: a unique index on a partitioned table must
-- hold the partition key, and a key must outlive its event's partition)
-- `refstream status` counts what was processed in the last minute; BRIN: tiny, append order
CREATE INDEX IF NOT EXISTS events_processed_brin ON events USING brin (processed_at);

-- unique clicks: a visitor's first click on a link in a UTC day. A set, not a count, so the
-- answer is the same whatever order clicks are processed in, and exactly once. Partitioned
-- by day like events, and dropped with them.
CREATE TABLE IF NOT EXISTS link_visitor_days (
    link_id     uuid NOT NULL,
    day         date NOT NULL,
    visitor_key text NOT NULL,
    PRIMARY KEY (link_id, day, visitor_key)
) PARTITION BY RANGE (day);

-- per link and UTC day; per affiliate and program by GROUP BY (both ids are carried)
CREATE TABLE IF NOT EXISTS daily_stats (
    link_id       uuid NOT NULL REFERENCES links (id) ON DELETE CASCADE,
    day           date NOT NULL,
    workspace_id  uuid NOT NULL,
    program_id    uuid,
    affiliate_id  uuid,
    clicks        bigint NOT NULL DEFAULT 0,
    unique_clicks bigint NOT NULL DEFAULT 0,
    bot_clicks    bigint NOT NULL DEFAULT 0,
    leads         bigint NOT NULL DEFAULT 0,
    conversions   bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (link_id, day)
);
CREATE INDEX IF NOT EXISTS daily_stats_affiliate ON daily_stats (affiliate_id, day);
CREATE INDEX IF NOT EXISTS daily_stats_program ON daily_stats (program_id, day);

-- seed 001's "refer 5 friends": thresholds on an affiliate's conversions, each reached once
CREATE TABLE IF NOT EXISTS milestones (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    program_id uuid NOT NULL REFERENCES programs (id) ON DELETE CASCADE,
    name       text NOT NULL,
    threshold  integer NOT NULL CHECK (threshold > 0),
    UNIQUE (program_id, threshold)
);
CREATE TABLE IF NOT EXISTS affiliate_milestones (
    affiliate_id uuid NOT NULL REFERENCES affiliates (id) ON DELETE CASCADE,
    milestone_id uuid NOT NULL REFERENCES milestones (id) ON DELETE CASCADE,
    reached_at   timestamptz NOT NULL,
    PRIMARY KEY (affiliate_id, milestone_id)
);

-- webhooks: per-workspace endpoints for lead.created, conversion.created, milestone.reached.
-- The signing secret is needed in full to sign, so it is stored encrypted (Fernet, key from
-- REFSTREAM_SECRET_KEY), never in clear; the prefix is for recognising it in listings.
CREATE TABLE IF NOT EXISTS webhooks (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    workspace_id     uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    url              text NOT NULL,
    events           text[] NOT NULL DEFAULT '{lead.created,conversion.created,milestone.reached}',
    secret_encrypted bytea NOT NULL,
    secret_prefix    text NOT NULL,
    active           boolean NOT NULL DEFAULT true,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS webhooks_workspace ON webhooks (workspace_id) WHERE active;

-- the outbox: one row per (webhook, event), written in the same transaction as the event,
-- so a delivery is never lost between COMMIT and the job queue, and never made twice
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    webhook_id   uuid NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event_type   text NOT NULL,
    subject_id   uuid NOT NULL,  -- the event id, or for milestone.reached the milestone id
    subject_key  text NOT NULL DEFAULT '',  -- for milestone.reached: the affiliate id
    payload      jsonb NOT NULL,
    status       text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts     integer NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz,
    UNIQUE (webhook_id, event_type, subject_id, subject_key)
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_pending ON webhook_deliveries (created_at) WHERE status = 'pending';

-- every attempt, successful or not
CREATE TABLE IF NOT EXISTS webhook_attempts (
    id          bigserial PRIMARY KEY,
    delivery_id uuid NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt     integer NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    status_code integer,
    error       text,
    duration_ms integer
);
CREATE INDEX IF NOT EXISTS webhook_attempts_delivery ON webhook_attempts (delivery_id, attempt);

-- customers: each contact field follows the latest event that carried a value for it (by
-- received time, then event id), and first touch the earliest event; the time and id of
-- that event are kept beside the value, so the row is the same however events are batched
ALTER TABLE customers
    ADD COLUMN IF NOT EXISTS first_event_id    uuid,
    ADD COLUMN IF NOT EXISTS external_id_at    timestamptz,
    ADD COLUMN IF NOT EXISTS external_id_event uuid,
    ADD COLUMN IF NOT EXISTS email_at          timestamptz,
    ADD COLUMN IF NOT EXISTS email_event       uuid,
    ADD COLUMN IF NOT EXISTS name_at           timestamptz,
    ADD COLUMN IF NOT EXISTS name_event        uuid,
    ADD COLUMN IF NOT EXISTS avatar_url_at     timestamptz,
    ADD COLUMN IF NOT EXISTS avatar_url_event  uuid;

-- bot clicks, per workspace: `exclude` (the default) counts them apart, in bot_clicks only;
-- `count` counts them as clicks too (unique clicks and last_clicked_at included), as bio.re's
-- counter does (it has no bot filter). Either way the event keeps is_bot, and bot_clicks
-- counts it. The policy is applied when a click is stored and recorded on its row
-- (bot_counted), so a change applies from then on and a recount reads what was decided.
ALTER TABLE workspaces
    ADD COLUMN IF NOT EXISTS bot_policy text NOT NULL DEFAULT 'exclude' CHECK (bot_policy IN ('exclude', 'count'));
ALTER TABLE events ADD COLUMN IF NOT EXISTS bot_counted boolean NOT NULL DEFAULT false;

-- schema 4: retention that scales. A database made before it holds plain `events` and
-- `link_visitor_days` tables: each becomes the first partition ("<table>_legacy", from
-- MINVALUE to the day after its newest row or today) of a partitioned table of the same
-- name, in this one transaction, without copying a row; the legacy partition is dropped
-- like any other once its newest day is past the retention.

-- the global dedupe keys: one lead per (customer, event name), one conversion per (code,
-- referred session). A table of its own, so a key outlives its event's partition: purged
-- after REFSTREAM_DEDUPE_RETENTION_DAYS days (at least the event retention) by received time
CREATE TABLE IF NOT EXISTS event_dedupe (
    workspace_id uuid NOT NULL,
    type         smallint NOT NULL,
    dedupe_key   text NOT NULL,
    event_id     uuid NOT NULL,
    received_at  timestamptz NOT NULL,
    PRIMARY KEY (workspace_id, type, dedupe_key)
);
CREATE INDEX IF NOT EXISTS event_dedupe_received ON event_dedupe (received_at);

-- how far back the event rows are complete: an event whose id is below horizon_id may have
-- been dropped with its partition. The worker stores such an event but moves no counter
-- (it cannot tell a first delivery from a replay), and reconcile never recounts before it
CREATE TABLE IF NOT EXISTS event_retention (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    horizon    timestamptz NOT NULL,
    horizon_id uuid NOT NULL
);

DO $convert$
DECLARE
    newest_ms bigint;
    bound_ms  bigint;
    bound     text;
    idx       record;
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'public.events'::regclass) = 'r' THEN
        LOCK TABLE events IN ACCESS EXCLUSIVE MODE;
        INSERT INTO event_dedupe (workspace_id, type, dedupe_key, event_id, received_at)
        SELECT DISTINCT ON (workspace_id, type, dedupe_key) workspace_id, type, dedupe_key, event_id, received_at
        FROM events WHERE dedupe_key IS NOT NULL
        ORDER BY workspace_id, type, dedupe_key, event_id
        ON CONFLICT DO NOTHING;
        DROP INDEX IF EXISTS events_dedupe;
        ALTER TABLE events RENAME TO events_legacy;
        FOR idx IN SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                   WHERE i.indrelid = 'public.events_legacy'::regclass LOOP
            EXECUTE format('ALTER INDEX %I RENAME TO %I', idx.relname, 'events_legacy' || substr(idx.relname, 7));
        END LOOP;
        CREATE TABLE events (LIKE events_legacy INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
            PARTITION BY RANGE (event_id);
        ALTER TABLE events ADD PRIMARY KEY (event_id);
        CREATE INDEX events_link_received ON events (link_id, received_at);
        CREATE INDEX events_received ON events (received_at);
        CREATE INDEX events_processed_brin ON events USING brin (processed_at);
        -- the newest id's millisecond (a UUIDv7's first 48 bits), or now
        SELECT ('x' || substr(replace(event_id::text, '-', ''), 1, 12))::bit(48)::bigint
          INTO newest_ms FROM events_legacy ORDER BY event_id DESC LIMIT 1;
        newest_ms := greatest(coalesce(newest_ms, 0), (extract(epoch FROM now()) * 1000)::bigint);
        bound_ms := (newest_ms / 86400000 + 1) * 86400000;
        bound := lpad(to_hex(bound_ms), 12, '0');
        bound := substr(bound, 1, 8) || '-' || substr(bound, 9, 4) || '-7000-8000-000000000000';
        EXECUTE format('ALTER TABLE events ATTACH PARTITION events_legacy FOR VALUES FROM (MINVALUE) TO (%L)', bound);
    END IF;
    IF (SELECT relkind FROM pg_class WHERE oid = 'public.link_visitor_days'::regclass) = 'r' THEN
        LOCK TABLE link_visitor_days IN ACCESS EXCLUSIVE MODE;
        ALTER TABLE link_visitor_days RENAME TO link_visitor_days_legacy;
        ALTER INDEX link_visitor_days_pkey RENAME TO link_visitor_days_legacy_pkey;
        CREATE TABLE link_visitor_days (LIKE link_visitor_days_legacy INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
            PARTITION BY RANGE (day);
        ALTER TABLE link_visitor_days ADD PRIMARY KEY (link_id, day, visitor_key);
        EXECUTE format(
            'ALTER TABLE link_visitor_days ATTACH PARTITION link_visitor_days_legacy FOR VALUES FROM (MINVALUE) TO (%L)',
            greatest((SELECT max(day) FROM link_visitor_days_legacy), (now() AT TIME ZONE 'UTC')::date) + 1);
    END IF;
END
$convert$;

-- whatever no daily partition covers (an id from a skewed clock, a day not yet created)
CREATE TABLE IF NOT EXISTS events_default PARTITION OF events DEFAULT;
CREATE TABLE IF NOT EXISTS link_visitor_days_default PARTITION OF link_visitor_days DEFAULT;

-- the management API's reads (GET /v1/events: a workspace's newest first, or of a type;
-- a type other than click by events_workspace_nonclick, schema 14; of a link by
-- events_link_received, schema 19)
CREATE INDEX IF NOT EXISTS events_workspace_id ON events (workspace_id, event_id);

-- ---------------------------------------------------------------------------------------
-- Drops and fraud flags (schema version 5). Why an event did not count, per link and UTC
-- day, by reason; the nil uuid stands for "no link resolved" (and for "no workspace" where
-- none did either), so that the key needs no NULLs.
CREATE TABLE IF NOT EXISTS drop_stats (
    workspace_id uuid NOT NULL,
    link_id      uuid NOT NULL,
    day          date NOT NULL,
    -- bot, unknown_code, inactive_link, rate_limited, out_of_window, test_mode, duplicate,
    -- invalid, fraud (excluded by the workspace's fraud policy); and flagged (not a drop:
    -- every fraud flag, excluded or not)
    reason       text NOT NULL,
    detail       text NOT NULL DEFAULT '',  -- the bot's sub-reason, the fraud rule
    -- worker: decided in a batch, and `refstream reconcile` recounts it from the rows;
    -- edge: the edge's refusals, folded from Redis (no row to recount them from)
    source       text NOT NULL CHECK (source IN ('worker', 'edge')),
    n            bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (workspace_id, link_id, day, reason, detail, source)
);
CREATE INDEX IF NOT EXISTS drop_stats_link ON drop_stats (link_id, day);

-- the worker's drops that leave no event row (an unknown code, an inactive link, a second
-- lead or conversion under one dedupe key): one row each, so a redelivery counts nothing
CREATE TABLE IF NOT EXISTS event_drops (
    event_id     uuid PRIMARY KEY,
    workspace_id uuid NOT NULL,
    link_id      uuid NOT NULL,
    reason       text NOT NULL,
    received_at  timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS event_drops_received ON event_drops (received_at);

-- the edge's refusals, tallied in Redis and folded in here: one row per folded Redis hash,
-- written in the transaction that adds it, so a fold retried after a crash adds nothing
CREATE TABLE IF NOT EXISTS drop_folds (
    fold_key  text PRIMARY KEY,
    folded_at timestamptz NOT NULL DEFAULT now()
);

-- fraud flags: rule and evidence on the event, never a deletion. `excluded`: the
-- workspace's policy for the rule was `exclude` when the event was stored, so it moved no
-- counter (recorded, so that a recount reads what was decided)
CREATE TABLE IF NOT EXISTS event_flags (
    event_id     uuid NOT NULL,
    rule         text NOT NULL,
    workspace_id uuid NOT NULL,
    link_id      uuid NOT NULL,
    affiliate_id uuid,
    type         smallint NOT NULL,
    excluded     boolean NOT NULL,
    evidence     jsonb NOT NULL DEFAULT '{}',
    received_at  timestamptz NOT NULL,
    PRIMARY KEY (event_id, rule)
);
-- (schema 5 to 16 also indexed the flags by (link_id, received_at) for the drops' recount:
-- dropped in schema 17, below, which reads the flags through their events)
-- the click_burst rule counts one IP's recent clicks on a link: a range scan of this
-- index, not of every click on the link in the window (until schema 18: click_windows)
CREATE INDEX IF NOT EXISTS events_click_ip ON events (link_id, ip, received_at) WHERE type = 1 AND ip IS NOT NULL;

-- the addresses an affiliate's own key was used from (the affiliate API): a lead from one
-- of them is flagged
CREATE TABLE IF NOT EXISTS affiliate_ips (
    affiliate_id uuid NOT NULL REFERENCES affiliates (id) ON DELETE CASCADE,
    ip           inet NOT NULL,
    first_seen   timestamptz NOT NULL DEFAULT now(),
    last_seen    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (affiliate_id, ip)
);

-- per rule: flag (the default) or exclude; absent rules are flagged
ALTER TABLE workspaces ADD COLUMN IF NOT EXISTS fraud_policy jsonb NOT NULL DEFAULT '{}';
-- per program: burst_clicks, burst_seconds, fast_conversion_seconds; absent ones take the defaults
ALTER TABLE programs ADD COLUMN IF NOT EXISTS fraud_thresholds jsonb NOT NULL DEFAULT '{}';

-- ---------------------------------------------------------------------------------------
-- Schema version 6: one clock, and a bound on every table.
--
-- The link cache's version (ingest/contract/links.py) is a sequence, never a clock: the cache keeps
-- an entry only for a version at least as new, and now() can step back. Each row the cached
-- link is made of carries the sequence's value of its last change that the cache shows; a
-- link's version is the greatest of its link's, workspace's, program's and affiliate's. The
-- sequence starts above every version the cache held before (microseconds of updated_at),
-- so an entry cached by an older build never outranks a change made after the upgrade.
DO $cache_version$
BEGIN
    IF to_regclass('public.link_cache_version') IS NULL THEN
        CREATE SEQUENCE link_cache_version;
        PERFORM setval('link_cache_version', greatest(
            (extract(epoch FROM now()) * 1000000)::bigint,
            (SELECT coalesce(max((extract(epoch FROM updated_at) * 1000000)::bigint), 0) FROM links)) + 1);
    END IF;
END
$cache_version$;
ALTER TABLE links ADD COLUMN IF NOT EXISTS cache_version bigint NOT NULL DEFAULT nextval('link_cache_version');
ALTER TABLE workspaces ADD COLUMN IF NOT EXISTS cache_version bigint NOT NULL DEFAULT nextval('link_cache_version');
ALTER TABLE programs ADD COLUMN IF NOT EXISTS cache_version bigint NOT NULL DEFAULT nextval('link_cache_version');
ALTER TABLE affiliates ADD COLUMN IF NOT EXISTS cache_version bigint NOT NULL DEFAULT nextval('link_cache_version');
CREATE OR REPLACE FUNCTION link_cache_bump() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.cache_version := nextval('link_cache_version');
    RETURN NEW;
END
$$;
-- only a change the cached link shows: the counters' updates (every batch) bump nothing
CREATE OR REPLACE TRIGGER links_cache_version BEFORE UPDATE ON links FOR EACH ROW
    WHEN ((OLD.workspace_id, OLD.program_id, OLD.affiliate_id, OLD.code, OLD.url, OLD.domain, OLD.status)
          IS DISTINCT FROM (NEW.workspace_id, NEW.program_id, NEW.affiliate_id, NEW.code, NEW.url, NEW.domain, NEW.status))
    EXECUTE FUNCTION link_cache_bump();
CREATE OR REPLACE TRIGGER workspaces_cache_version BEFORE UPDATE ON workspaces FOR EACH ROW
    WHEN (OLD.allowed_origins IS DISTINCT FROM NEW.allowed_origins)
    EXECUTE FUNCTION link_cache_bump();
CREATE OR REPLACE TRIGGER programs_cache_version BEFORE UPDATE ON programs FOR EACH ROW
    WHEN ((OLD.cookie_window_days, OLD.attribution) IS DISTINCT FROM (NEW.cookie_window_days, NEW.attribution))
    EXECUTE FUNCTION link_cache_bump();
CREATE OR REPLACE TRIGGER affiliates_cache_version BEFORE UPDATE ON affiliates FOR EACH ROW
    WHEN (OLD.external_id IS DISTINCT FROM NEW.external_id)
    EXECUTE FUNCTION link_cache_bump();

-- Every table's bound. Retention runs in the workers' partition maintenance
-- (workers/consumer/partitions.py, workers/consumer/retention.py), on Postgres's day, under its advisory lock:
--   events, link_visitor_days   daily partitions, dropped after REFSTREAM_EVENT_RETENTION_DAYS days
--   event_dedupe                 purged after REFSTREAM_DEDUPE_RETENTION_DAYS days (received_at)
--   event_flags, event_drops     purged with the events: every row below the horizon (event id)
--   webhook_deliveries           delivered or failed ones purged REFSTREAM_WEBHOOK_RETENTION_DAYS days
--                                after they were made; pending ones are kept until delivered
--   webhook_attempts             at most the job's tries per delivery, deleted with it (cascade)
--   affiliate_ips                an address not seen for REFSTREAM_EVENT_RETENTION_DAYS days is purged
--   drop_folds                   purged after 7 days (workers/consumer/drops.py)
--   event_retention, refstream_schema   one row each
--   daily_stats, drop_stats      the durable history: at most one row per link and UTC day with
--                                activity (drop_stats: per reason and source); daily_stats
--                                deleted with its link
--   customers                    one row per (workspace, visitor): the product's data, deleted
--                                with its workspace or by an erasure
--   workspaces, programs, affiliates, api_keys, links, webhooks, milestones,
--   affiliate_milestones         configuration: what operators create (affiliate_milestones at
--                                most affiliates x milestones), deleted with their owner
CREATE INDEX IF NOT EXISTS webhook_deliveries_created ON webhook_deliveries (created_at) WHERE status <> 'pending';
CREATE INDEX IF NOT EXISTS affiliate_ips_last_seen ON affiliate_ips (last_seen);

-- ---------------------------------------------------------------------------------------
-- Schema version 7: sales. One row per counted sale, its amount an exact integer in the
-- currency's minor unit. Kept as the revenue ledger: deleted with its workspace, never by
-- the event retention. The primary key is the edge-minted event id (a redelivery or a
-- replay inserts nothing); an invoice is unique per workspace, for any number of copies
-- at any distance apart, so the first copy counts and the others count nothing.
CREATE TABLE IF NOT EXISTS sales (
    event_id             uuid PRIMARY KEY,
    workspace_id         uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    invoice_id           text,
    customer_external_id text NOT NULL,
    amount               bigint NOT NULL CHECK (amount >= 0),
    currency             text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    event_name           text NOT NULL,
    payment_processor    text NOT NULL,
    lead_event_name      text,
    -- the customer's lead this sale is attributed to, and through it the click, link,
    -- affiliate and program; all NULL when unattributed, and `unattributed` says why:
    -- no_lead (no lead of the customer received before the sale, within the program's
    -- attribution window). A lead stored after its sale (processed out of order) attributes
    -- it then: the outcome depends on when each was received, never on processing order
    lead_event_id        uuid,
    click_id             uuid,
    link_id              uuid,
    affiliate_id         uuid,
    program_id           uuid,
    unattributed         text CHECK (unattributed IN ('no_lead')),
    dialect              text NOT NULL,
    received_at          timestamptz NOT NULL,
    processed_at         timestamptz NOT NULL DEFAULT now(),
    metadata             jsonb,
    CHECK ((link_id IS NULL) = (unattributed IS NOT NULL))
);
CREATE UNIQUE INDEX IF NOT EXISTS sales_invoice ON sales (workspace_id, invoice_id) WHERE invoice_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS sales_customer ON sales (workspace_id, customer_external_id, received_at);
CREATE INDEX IF NOT EXISTS sales_link ON sales (link_id, received_at);
-- GET /v1/conversions: newest first, of a workspace or an affiliate (of a link or a
-- customer: the two above)
CREATE INDEX IF NOT EXISTS sales_workspace ON sales (workspace_id, event_id);
CREATE INDEX IF NOT EXISTS sales_affiliate ON sales (affiliate_id, event_id);
-- (a sale's lead was read from events by events_lead_customer until schema 12: customer_leads now)

-- sales and revenue per link (the nil uuid: unattributed), UTC day and currency; currencies
-- are kept apart, never converted. Moved in the sale's transaction from the rows it
-- inserted, and recounted from `sales` by `refstream reconcile`: the durable history, at
-- most one row per link, day and currency with a sale
CREATE TABLE IF NOT EXISTS sale_stats (
    workspace_id uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    link_id      uuid NOT NULL,
    day          date NOT NULL,
    currency     text NOT NULL,
    sales        bigint NOT NULL DEFAULT 0,
    amount       bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (workspace_id, link_id, day, currency)
);
CREATE INDEX IF NOT EXISTS sale_stats_link ON sale_stats (link_id, day);
-- a workspace's stats (GET /v1/stats)
CREATE INDEX IF NOT EXISTS daily_stats_workspace ON daily_stats (workspace_id, day);

-- Commissions (schema version 7 too). A program's rules (ingest/contract/commission.py) as
-- set through the management API; each counted sale or lead of one of its affiliates earns
-- a commission row, in the transaction that counts it, exactly once (UNIQUE (kind, source)).
-- The ledger is never edited but for its status: a sale's commission that no longer holds
-- (duration first_sale, and an earlier sale of the customer arrived) is taken back by a
-- reversal row of the opposite amount. Status: pending until approve_after (the program's
-- hold), then approved (the workers' cron, on Postgres's clock), paid in a payout.
ALTER TABLE programs ADD COLUMN IF NOT EXISTS commission jsonb NOT NULL DEFAULT '{}';
CREATE TABLE IF NOT EXISTS commissions (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    seq           bigint GENERATED ALWAYS AS IDENTITY,  -- newest first, and the lists' cursor
    workspace_id  uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    program_id    uuid NOT NULL,
    affiliate_id  uuid NOT NULL,
    link_id       uuid,
    kind          text NOT NULL CHECK (kind IN ('sale', 'lead', 'reversal')),
    -- the duration it was earned under (lifetime, months, first_sale; lead): a first_sale
    -- reversal takes back only what first_sale granted, never what earlier rules did
    rule          text,
    -- the sale's or the lead's event id; a reversal's: the sale whose commission it takes back
    source_id     uuid NOT NULL,
    customer_external_id text,
    amount        bigint NOT NULL,  -- minor units; a reversal's is negative
    currency      text NOT NULL,
    status        text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'approved', 'paid')),
    earned_at     timestamptz NOT NULL,  -- when its sale or lead was received
    approve_after timestamptz NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (kind, source_id)
);
CREATE INDEX IF NOT EXISTS commissions_workspace ON commissions (workspace_id, seq);
CREATE INDEX IF NOT EXISTS commissions_affiliate ON commissions (affiliate_id, seq);
CREATE INDEX IF NOT EXISTS commissions_pending ON commissions (approve_after) WHERE status = 'pending';
-- the stats' commission per day and currency: of links, of a workspace
CREATE INDEX IF NOT EXISTS commissions_link ON commissions (link_id, earned_at);
CREATE INDEX IF NOT EXISTS commissions_earned ON commissions (workspace_id, earned_at);
-- a payout: an affiliate's approved, unpaid commissions in one currency (reversals too: a
-- commission taken back after it was paid carries into the next one), made through the
-- management API; marked paid when the money went out, and its commissions with it
CREATE TABLE IF NOT EXISTS payouts (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    seq          bigint GENERATED ALWAYS AS IDENTITY,
    workspace_id uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    affiliate_id uuid NOT NULL,
    currency     text NOT NULL,
    amount       bigint NOT NULL CHECK (amount > 0),
    commissions  integer NOT NULL,
    status       text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'paid')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    paid_at      timestamptz
);
CREATE INDEX IF NOT EXISTS payouts_workspace ON payouts (workspace_id, seq);
CREATE INDEX IF NOT EXISTS payouts_affiliate ON payouts (affiliate_id, seq);
ALTER TABLE commissions ADD COLUMN IF NOT EXISTS payout_id uuid REFERENCES payouts (id);
CREATE INDEX IF NOT EXISTS commissions_unpaid ON commissions (affiliate_id, currency) WHERE status = 'approved'
    AND payout_id IS NULL;
CREATE INDEX IF NOT EXISTS commissions_payout ON commissions (payout_id) WHERE payout_id IS NOT NULL;

-- ---------------------------------------------------------------------------------------
-- Schema version 8: refunds. Each refund of a sale is a row of its own, never an edit of
-- the sale: its amount positive, in the sale's currency. A refund is idempotent on its key
-- (the client's refundId, or its Idempotency-Key digested), per workspace, for ever. The
-- sale carries the running totals its refunds' transaction moves under the sale's row lock,
-- so the refunded total can never exceed the sale's amount (the CHECK holds it besides).
-- Written by the edge in one transaction (ingest/ledger/refunds.py): kept as the revenue
-- ledger, deleted with its workspace.
ALTER TABLE sales ADD COLUMN IF NOT EXISTS refunded bigint NOT NULL DEFAULT 0;
ALTER TABLE sales ADD COLUMN IF NOT EXISTS refunds integer NOT NULL DEFAULT 0;
DO $$ BEGIN
    ALTER TABLE sales ADD CONSTRAINT sales_refunded_within CHECK (refunded >= 0 AND refunded <= amount);
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;
CREATE TABLE IF NOT EXISTS refunds (
    id            uuid PRIMARY KEY,  -- minted by the edge, like an event id
    seq           bigint GENERATED ALWAYS AS IDENTITY,
    workspace_id  uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    refund_key    text NOT NULL,     -- 'id:' + the refundId, or 'idem:' + the Idempotency-Key's digest
    fingerprint   text NOT NULL,     -- what its request asked: a repeat must ask the same
    sale_id       uuid NOT NULL REFERENCES sales (event_id) ON DELETE CASCADE,
    invoice_id    text NOT NULL,
    amount        bigint NOT NULL CHECK (amount > 0),
    currency      text NOT NULL,
    reason        text,
    dialect       text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (workspace_id, refund_key)
);
CREATE INDEX IF NOT EXISTS refunds_sale ON refunds (sale_id, seq);
CREATE INDEX IF NOT EXISTS refunds_workspace ON refunds (workspace_id, seq);
-- refunds and the refunded amount per link, day and currency of the sale they refund (a
-- late attribution moves them with it): recounted from `refunds` by reconcile
ALTER TABLE sale_stats ADD COLUMN IF NOT EXISTS refunds bigint NOT NULL DEFAULT 0;
ALTER TABLE sale_stats ADD COLUMN IF NOT EXISTS refunded bigint NOT NULL DEFAULT 0;
-- a clawback: what a refund takes back of its sale's commission, pro rata, as a row of its
-- own (negative); its source the refund, `sale_id` the sale. Pending until the sale's
-- commission would be approved (at once if it is), and then carried into the next payout
-- like any approved row: a clawback of a paid commission lowers the next one
ALTER TABLE commissions ADD COLUMN IF NOT EXISTS sale_id uuid;
ALTER TABLE commissions DROP CONSTRAINT IF EXISTS commissions_kind_check;
DO $$ BEGIN
    ALTER TABLE commissions ADD CONSTRAINT commissions_kind_known
        CHECK (kind IN ('sale', 'lead', 'reversal', 'clawback'));
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;
CREATE INDEX IF NOT EXISTS commissions_sale ON commissions (sale_id) WHERE sale_id IS NOT NULL;

-- ---------------------------------------------------------------------------------------
-- Schema version 9: erasure. The ledger of erased people holds no personal data: keyed
-- digests (HMAC-SHA256 under `erasure_salt`, random and made once) of an erased
-- customer's external id, visitor ids and click ids, and what each place still holds.
-- Every writer checks it (ingest/contract/erasure.py): an erased person's events that
-- arrive later (late, replayed, drained from a spool, imported) are stored scrubbed.
CREATE TABLE IF NOT EXISTS erasure_salt (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    salt      bytea NOT NULL CHECK (length(salt) = 32)
);
-- made once, here: two 122-bit random UUIDs (gen_random_uuid is core; pgcrypto is not needed)
INSERT INTO erasure_salt (salt)
SELECT decode(replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', ''), 'hex')
ON CONFLICT (singleton) DO NOTHING;
CREATE TABLE IF NOT EXISTS erasures (
    id              uuid PRIMARY KEY,
    workspace_id    uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    subject         bytea NOT NULL,  -- the external id's digest, never the id
    requested_at    timestamptz NOT NULL DEFAULT now(),
    requested_by    text NOT NULL,   -- an API key's prefix, or "cli"
    -- the earliest of the person's events: where the archive pass begins (NULL: no event)
    since           timestamptz,
    -- the archive's segments are rewritten by then (REFSTREAM_ERASE_ARCHIVE_DAYS)
    archive_due     timestamptz NOT NULL,
    postgres_at     timestamptz,     -- each place done: Postgres, Redis, the archive
    redis_at        timestamptz,
    archive_at      timestamptz,
    done            jsonb NOT NULL DEFAULT '{}',  -- counts of what each pass changed
    -- moved on by whatever makes the erasure pending again (a second erasure of the person, a
    -- writer that met a copy of theirs): a sweep marks a place done only where it is unchanged
    generation      bigint NOT NULL DEFAULT 0,
    UNIQUE (workspace_id, subject)
);
CREATE INDEX IF NOT EXISTS erasures_pending ON erasures (requested_at) WHERE archive_at IS NULL;
CREATE TABLE IF NOT EXISTS erased_ids (
    digest     bytea PRIMARY KEY,
    erasure_id uuid NOT NULL REFERENCES erasures (id) ON DELETE CASCADE,
    kind       text NOT NULL CHECK (kind IN ('x', 'v', 'i'))  -- external id, visitor id, event id
);
CREATE INDEX IF NOT EXISTS erased_ids_erasure ON erased_ids (erasure_id);

-- Schema version 10: do-not-track lists. A workspace's visitors, customers and addresses
-- whose events the edge answers as usual and stores nowhere (a drop, `suppressed`); keyed
-- digests (the erasure salt), never the values (ingest/contract/suppression.py)
CREATE TABLE IF NOT EXISTS suppressions (
    workspace_id uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    kind         text NOT NULL CHECK (kind IN ('visitor', 'customer', 'ip')),
    digest       bytea NOT NULL CHECK (length(digest) = 16),
    created_at   timestamptz NOT NULL DEFAULT now(),
    created_by   text NOT NULL,  -- the key's prefix, or "cli"
    PRIMARY KEY (workspace_id, digest)
);

--   sales, sale_stats,           the revenue ledger, its daily sums, the commission ledger
--   commissions, payouts         and its payouts: kept, deleted with their workspace
--   refunds                      the refunds of sales: kept, deleted with their workspace
--   erasures, erased_ids         the erasure ledger: one row per erased person, and one per
--                                identifier of theirs; kept (a later event must still find it),
--                                deleted with their workspace; erasure_salt one row
--   suppressions                 what a workspace lists: deleted by it, or with the workspace
--   customer_leads               a customer's counted leads (what attributes their sales and
--                                times the commission rules): kept, deleted with their workspace

-- Schema version 11: the erasure ledger per workspace (docs/privacy.md, *Between workspaces*). An
-- entry of `erased_ids` protects one workspace: a visitor id, a click id or an import's id
-- that two workspaces' clients chose alike is erased in one and stays in the other, and a
-- workspace's deletion takes only its own entries (with its erasures). An entry written
-- before (digest alone, one for every workspace) keeps protecting where it could have been
-- relied on: its own erasure's workspace, and every other workspace with an erasure then
-- (its own erasure of the same id found the entry held and wrote none: ON CONFLICT DO
-- NOTHING), each copy under that workspace's first erasure, so it goes with that workspace.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema()
                   AND table_name = 'erased_ids' AND column_name = 'workspace_id') THEN
        ALTER TABLE erased_ids ADD COLUMN workspace_id uuid;
        UPDATE erased_ids i SET workspace_id = e.workspace_id FROM erasures e WHERE e.id = i.erasure_id;
        ALTER TABLE erased_ids DROP CONSTRAINT erased_ids_pkey;
        INSERT INTO erased_ids (digest, erasure_id, kind, workspace_id)
        SELECT i.digest, w.id, i.kind, w.workspace_id
        FROM erased_ids i
        CROSS JOIN (SELECT DISTINCT ON (workspace_id) id, workspace_id FROM erasures
                    ORDER BY workspace_id, requested_at, id) w
        WHERE i.kind <> 'x' AND w.workspace_id <> i.workspace_id;
        ALTER TABLE erased_ids ALTER COLUMN workspace_id SET NOT NULL;
        ALTER TABLE erased_ids ADD PRIMARY KEY (digest, workspace_id);
    END IF;
END $$;
-- the sweep's re-check of Postgres, once per generation of an erasure (not every sweep):
-- the generation it last re-checked (ingest/privacy/erasure_late.py)
ALTER TABLE erasures ADD COLUMN IF NOT EXISTS rechecked bigint;
-- an erasure's look for the person's events (ingest/privacy/erasure.py _EVENTS): by customer,
-- by visitor, by the click a lead names, each an index range in the workspace, not a scan of
-- its events (only leads and sales carry a customer, only leads and conversions a click)
-- (by visitor: events_workspace_visitor_known, schema 14; by click: events_workspace_named_click,
-- schema 20)
CREATE INDEX IF NOT EXISTS events_workspace_customer ON events (workspace_id, customer_external_id, event_id)
    WHERE customer_external_id IS NOT NULL;

-- Schema version 12: money holds for the life of the rule (docs/guarantees.md, *Commissions*).
-- A program's flat amount per sale is a mapping of currency to that currency's minor units,
-- stored as `sale_flats` (ingest/contract/commission.py). The older single number
-- (`sale_flat`, applied to every currency alike: 500 was $5.00 and ¥500 and 0.500 KWD) was
-- meant in the program's currency, lead_currency (usd unless set): rewritten so, once; a
-- worker of an older build then reads no flat amount, never a wrong one.
UPDATE programs
SET commission = (commission - 'sale_flat') || jsonb_build_object('sale_flats', CASE
    WHEN (commission->>'sale_flat')::numeric > 0
    THEN jsonb_build_object(lower(coalesce(commission->>'lead_currency', 'usd')), commission->'sale_flat')
    ELSE '{}'::jsonb END)
WHERE jsonb_typeof(commission->'sale_flat') = 'number';
-- a customer's counted leads (not test mode, within their cookie window, not excluded by a
-- fraud rule), one row each, written by the batch that counts the lead
-- (workers/consumer/sales.py) and kept past the event retention, like the sales they
-- attribute: a sale is its customer's newest lead's however long after ("lifetime" means
-- lifetime), `months` counts from the first, and `lead_flat` is earned once. Kept, deleted
-- with the workspace; an erasure renames the customer as it does in sales and commissions
CREATE TABLE IF NOT EXISTS customer_leads (
    event_id             uuid PRIMARY KEY,  -- the lead's event id
    workspace_id         uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    customer_external_id text NOT NULL,
    name                 text,
    link_id              uuid,
    click_id             uuid,
    affiliate_id         uuid,
    program_id           uuid,
    dialect              text NOT NULL,
    received_at          timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS customer_leads_customer ON customer_leads (workspace_id, customer_external_id, received_at);
-- the counted leads still in `events`, once for each migrate (a lead that a worker of an
-- older build stored after the last one is brought in by the next: run migrate again once
-- every worker runs this build)
INSERT INTO customer_leads (event_id, workspace_id, customer_external_id, name, link_id, click_id, affiliate_id,
                            program_id, dialect, received_at)
SELECT e.event_id, e.workspace_id, e.customer_external_id, e.name, e.link_id, e.click_id, e.affiliate_id,
       e.program_id, e.dialect, e.received_at
FROM events e
WHERE e.type = 2 AND e.customer_external_id IS NOT NULL AND NOT e.test_mode AND NOT e.out_of_window
  AND NOT EXISTS (SELECT 1 FROM event_flags f WHERE f.event_id = e.event_id AND f.excluded)
  AND e.event_id >= coalesce((SELECT horizon_id FROM event_retention), '00000000-0000-0000-0000-000000000000')
ORDER BY e.event_id
ON CONFLICT (event_id) DO NOTHING;

-- Schema version 13: the import of history (workers/ops/import_clicks.py). The clicks an
-- import stored, by the workspace, the source and a digest of the source's own id of the
-- click, so that a lead naming its click by that id finds it in any later batch, a later
-- run, or a run resumed past the click (the import keeps no map in memory). Only the event
-- id: the click's link and visitor are read from the click's own row (an erasure scrubs
-- them there). Deleted with their workspace.
CREATE TABLE IF NOT EXISTS import_clicks (
    workspace_id  uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    source        text NOT NULL,
    source_digest bytea NOT NULL CHECK (length(source_digest) = 12),
    event_id      uuid NOT NULL,
    PRIMARY KEY (workspace_id, source, source_digest)
);

-- Schema version 14: an index on `events` only where a named read needs it (the table of
-- reads and indexes: docs/capacity.md). No read asks for events by received time alone
-- (reconcile's recount goes by link, events_link_received; `refstream status` and the
-- console by processed time, the BRIN), and a sale's lead is read from customer_leads (an
-- erasure finds a customer's leads by events_workspace_customer): both are dropped, which
-- only edits the catalog (and unlinks the files at commit) under the lock this transaction
-- takes on `events` anyway (its ALTER TABLE ... ADD COLUMN IF NOT EXISTS above).
DROP INDEX IF EXISTS events_received;
DROP INDEX IF EXISTS events_lead_customer;
-- Two narrower indexes replace two that held every click: GET /v1/events?type=lead or
-- conversion reads events_workspace_nonclick (a click, most rows, is read by
-- events_workspace_id and its type checked on the row), and an erasure looks for a person's
-- visitor ids in events_workspace_visitor_known (a row without a visitor id, every bio.re
-- click's, is never looked for). On a database made before, each is made here on the
-- partitioned table only (invalid, so no plan uses it yet), and `refstream migrate` builds it
-- after this transaction on each partition CONCURRENTLY, attaches it, and then drops the one
-- it replaces (ingest/manage/online.py); a partition created meanwhile gets it at once. On a
-- new database, with nothing to replace, they are made at once.
DO $online$
BEGIN
    IF to_regclass('events_workspace_nonclick') IS NULL THEN
        IF to_regclass('events_workspace_type_id') IS NULL THEN
            CREATE INDEX events_workspace_nonclick ON events (workspace_id, type, event_id) WHERE type <> 1;
        ELSE
            CREATE INDEX events_workspace_nonclick ON ONLY events (workspace_id, type, event_id) WHERE type <> 1;
        END IF;
    END IF;
    IF to_regclass('events_workspace_visitor_known') IS NULL THEN
        IF to_regclass('events_workspace_visitor') IS NULL THEN
            CREATE INDEX events_workspace_visitor_known ON events (workspace_id, visitor_id, event_id)
                WHERE visitor_id IS NOT NULL;
        ELSE
            CREATE INDEX events_workspace_visitor_known ON ONLY events (workspace_id, visitor_id, event_id)
                WHERE visitor_id IS NOT NULL;
        END IF;
    END IF;
END
$online$;

-- Schema version 15: a key may expire (`refstream keys create --expires-in 30d`, `POST
-- /v1/keys` with `expires_in_s`). Past `expires_at` every edge and the console refuse it
-- like a revoked key; NULL: it lives until revoked.
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS expires_at timestamptz;

-- Schema version 16: a click's enrichment without what repeats. Of the document the worker
-- made (workers/consumer/enrich.py), what a User-Agent says (browser, OS, device and their
-- versions) and the versions of the data and parsers that said it are the same for every
-- click of one browser build: stored once, in `event_devices`, and named by the row's
-- `device_id`. The row's `enrichment` keeps only what its address and referrer told and
-- its columns do not hold (AS name, city, region, coordinates, bot reason, referrer
-- domain; an IPv6 address as the worker wrote it), and none of the keys whose value is
-- null. `event_enrichment(...)` gives the document as it was (GET /v1/events reads it
-- so). A row written before, or by a worker of an older build, has no device_id and its
-- whole document in `enrichment`: read as it is, never rewritten (its partition goes with
-- the retention). A device is no one's: an erasure scrubs the row (its `enrichment`, ip,
-- asn), never the dictionary, as it never scrubbed the device fields. Bounded by the
-- browser builds seen times the worker builds that parsed them; kept (the retention
-- keeps no count of references, and a row a day old may name any entry).
CREATE TABLE IF NOT EXISTS event_devices (
    id  integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    doc jsonb NOT NULL UNIQUE
);
ALTER TABLE events ADD COLUMN IF NOT EXISTS device_id integer;
CREATE OR REPLACE FUNCTION event_enrichment(doc jsonb, device integer, ip inet, country text, asn integer,
                                            is_bot boolean) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN device IS NULL THEN doc ELSE jsonb_build_object(
        'ip', coalesce(doc->'ip', to_jsonb(host(ip))), 'country', country, 'asn', asn,
        'as_name', doc->'as_name', 'city', doc->'city', 'region', doc->'region',
        'latitude', doc->'latitude', 'longitude', doc->'longitude', 'is_bot', is_bot,
        'bot_reason', doc->'bot_reason', 'referrer_domain', doc->'referrer_domain')
        || (SELECT d.doc FROM event_devices d WHERE d.id = device) END
$$;

-- Schema version 17: a flag holds what its event's row does not. A flag is stored beside
-- its event, in the event's transaction, by event id: its link, affiliate, type and
-- received time are the event row's, read through it (the drops' recount goes by the
-- events of a chunk of links, events_link_received, and finds their flags by event id; an
-- affiliate's erasure finds theirs by joining the events). This build writes them NULL;
-- a row written before keeps them, read the same way. The click_burst rule's evidence no
-- longer copies the click's address either: it is the event's own `ip`, which an erasure
-- scrubs there. So a flagged click writes about a hundred bytes less, and one index
-- entry less: the index by (link_id, received_at) had no other read. `workspace_id`
-- stays: a workspace's deletion and an affiliate's erasure find a workspace's flags by it.
ALTER TABLE event_flags ALTER COLUMN link_id DROP NOT NULL, ALTER COLUMN type DROP NOT NULL,
    ALTER COLUMN received_at DROP NOT NULL;
DROP INDEX IF EXISTS event_flags_link;

-- Schema version 17, too: what an address tells of its network beside its country and AS number
-- (the AS name, and with a City database the city, region and coordinates) is the geo
-- data's, the same for every address of the network: stored once, in `event_places`, and
-- named by the row's `place_id`, as schema 16 did for the device. The row's `enrichment`
-- keeps the bot reason, the referrer's domain and an IPv6 address as the worker wrote it.
-- `event_enrichment(doc, device, place, ...)` gives the document as it was; the six-argument
-- form of schema 16 still reads a row without a place. A row written before keeps its
-- document, read as it is. A place is no one's (the geo data's): an erasure scrubs the
-- row's name of it (`place_id`), never the dictionary. Bounded by the geo data's networks;
-- kept, like the devices.
CREATE TABLE IF NOT EXISTS event_places (
    id  integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    doc jsonb NOT NULL UNIQUE
);
ALTER TABLE events ADD COLUMN IF NOT EXISTS place_id integer;
CREATE OR REPLACE FUNCTION event_enrichment(doc jsonb, device integer, place integer, ip inet, country text,
                                            asn integer, is_bot boolean) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT event_enrichment(CASE WHEN place IS NULL THEN doc
                                 ELSE coalesce(doc, '{}') || (SELECT p.doc FROM event_places p WHERE p.id = place) END,
                            device, ip, country, asn, is_bot)
$$;

-- Schema version 17, too: a row's payload without what the row holds. Every event is stored
-- under the link its payload's `code` named, and a click's `referrer` column is its
-- payload's referrer: the worker leaves both out of `payload` (a row without a `code` is of
-- this form), and `event_payload(payload, link_id, referrer)` puts them back (GET
-- /v1/events and the console read it so). A row written before keeps its payload whole and
-- reads as it is. An erasure scrubs the payload it stores and NULLs `referrer`, so either
-- form reads without the referrer after it.
CREATE OR REPLACE FUNCTION event_payload(payload jsonb, link uuid, referrer text) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN payload ? 'code' THEN payload
                ELSE payload || jsonb_build_object('code', (SELECT l.code FROM links l WHERE l.id = link))
                     || CASE WHEN referrer IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('referrer', referrer) END
           END
$$;

-- Schema version 18: the click_burst rule counts from a window per link and address, not
-- from an index of every click. A row holds the newest `keep` clicks stored from `ip` on
-- `link_id` (received time in ms and event id, in that order; `keep` is the link's
-- program's burst_clicks + 1, where a count stops), merged by each batch in its
-- transaction (workers/consumer/bursts.py). `until` is its newest click's time + the
-- window: past it the row counts nothing, and the consumer's timer deletes it, so the table
-- holds the pairs that clicked within a window, not every click. A click used to write an
-- entry in `events_click_ip` (55-97 bytes, kept for the event retention) and read a range
-- of it: both go. An older worker still counts, through events_link_received (slower); an
-- erasure deletes its person's pairs, a workspace's deletion its links' (keyed by link).
CREATE TABLE IF NOT EXISTS click_windows (
    link_id uuid NOT NULL,
    ip      inet NOT NULL,
    keep    integer NOT NULL,
    until   timestamptz NOT NULL,
    ats     bigint[] NOT NULL,
    ids     uuid[] NOT NULL,
    PRIMARY KEY (link_id, ip)
);
DROP INDEX IF EXISTS events_click_ip;
-- Schema version 18, too: a click_burst flag on its click's row. The rule runs before the
-- batch's events are inserted, so a flag the workspace does not exclude is written as two
-- columns of the click's row (the threshold it crossed and the window, its evidence's; its
-- count is the threshold + 1), not as an `event_flags` row of about 200 bytes with its key.
-- An excluded one changes what its event counted, and keeps its `event_flags` row, as a flag
-- of any other rule does. A flag stored before keeps its row; readers take either form.
ALTER TABLE events ADD COLUMN IF NOT EXISTS burst_clicks integer, ADD COLUMN IF NOT EXISTS burst_seconds integer;

-- Schema version 19: a link's events by one index. `events_link_id` (link_id, event_id; 82-98
-- bytes a click, a click's largest index since schema 18) served one read, GET
-- /v1/events?link_id= (and the console's tail of a link), newest first by event id.
-- `events_link_received` (link_id, received_at), which reconcile and the drops' recount
-- need, serves it newest first by received time (ties by event id), each partition's scan
-- in time order, merged, and stopped at the limit. An event's id is minted with its
-- received time (the edge, the import), so the two orders differ only where a producer set
-- them apart. A catalog change under the lock on `events` every migrate takes; the rollback
-- is docs/operations.md "Migrating to schema 19".
DROP INDEX IF EXISTS events_link_id;

-- Schema version 20: a row's User-Agent by a small id. The text a browser sends (118 bytes a
-- click on average in the bench's mix, the row's largest column) repeats across the clicks
-- of every visitor with the same browser build: stored once in `event_agents`, named by the
-- row's `agent_id`, its `user_agent` written NULL. `digest` is the text's SHA-256 (its unique
-- index: a long User-Agent's text could outgrow a btree entry), made by the worker.
-- `event_user_agent(user_agent, agent_id)` reads either form (GET /v1/events, an erasure's
-- look); a row written before keeps its text, read as it is. An erasure scrubs the row's
-- name of it (`agent_id`), as it does its `user_agent`: the entry itself, a browser's text
-- no row of the person's names any more, stays, like the devices and places (entries are
-- never deleted, so an id a worker remembers stays right). The rollback is
-- docs/operations.md "Migrating to schema 20".
CREATE TABLE IF NOT EXISTS event_agents (
    id  integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    digest bytea NOT NULL UNIQUE,
    ua  text NOT NULL
);
ALTER TABLE events ADD COLUMN IF NOT EXISTS agent_id integer;
CREATE OR REPLACE FUNCTION event_user_agent(ua text, agent integer) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN agent IS NULL THEN ua ELSE (SELECT a.ua FROM event_agents a WHERE a.id = agent) END
$$;

-- Schema version 20, too: the events naming a click, without the click itself. An erasure
-- looks for the events naming the person's clicks: a lead's, a conversion's, a repeat
-- Affitor click's (it carries its first click's id). A click whose id is its own (every
-- first Affitor click) is found by the primary key in the same look, so the index holds
-- only the rows whose click id is another's: 58 bytes a click less in the bench's mix, and
-- an index entry fewer to write. It replaces `events_workspace_click` (WHERE click_id IS
-- NOT NULL), built online where that one exists (ingest/manage/online.py: ON ONLY the
-- partitioned table here, then CONCURRENTLY on each partition, and the old one dropped
-- once the new is valid); on a new database, made at once.
DO $online$
BEGIN
    IF to_regclass('events_workspace_named_click') IS NULL THEN
        IF to_regclass('events_workspace_click') IS NULL THEN
            CREATE INDEX events_workspace_named_click ON events (workspace_id, click_id, event_id)
                WHERE click_id IS NOT NULL AND click_id <> event_id;
        ELSE
            CREATE INDEX events_workspace_named_click ON ONLY events (workspace_id, click_id, event_id)
                WHERE click_id IS NOT NULL AND click_id <> event_id;
        END IF;
    END IF;
END
$online$;

-- Schema version 20, too: a click's payload without its ids. A click's `click_id` and
-- `visitor_id` columns are its payload's (the click id as the uuid it mints back from): the
-- worker leaves both out of a click's stored `payload` where the column gives back the same
-- text, and `event_payload(payload, link, referrer, click, visitor)` puts them back, with
-- the code and the referrer (GET /v1/events and the console read it so). Only a click's: a
-- lead's or conversion's payload stays as schema 17 stores it (an erasure's scrub of the
-- row reads their visitor id from it). A row written before keeps its ids in its payload,
-- and reads as it is: an id is put back only where the payload lacks it. An erasure
-- pseudonymises the visitor id in the column and the payload alike, so either form reads
-- the pseudonym after it; a click id is no one's.
CREATE OR REPLACE FUNCTION event_payload_ids(payload jsonb, click uuid, visitor text) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT payload
        || CASE WHEN click IS NULL OR payload ? 'click_id' THEN '{}'::jsonb
                ELSE jsonb_build_object('click_id', 'clk_' || replace(click::text, '-', '')) END
        || CASE WHEN visitor IS NULL OR payload ? 'visitor_id' THEN '{}'::jsonb
                ELSE jsonb_build_object('visitor_id', visitor) END
$$;
CREATE OR REPLACE FUNCTION event_payload(payload jsonb, link uuid, referrer text, click uuid, visitor text)
RETURNS jsonb LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN payload ? 'code' THEN payload
                ELSE event_payload_ids(event_payload(payload, link, referrer), click, visitor) END
$$;

-- Schema version 21: a click_burst window as one byte string. `burst_windows` holds what
-- `click_windows` did (schema 18), a pair's newest `keep` clicks stored, as one bytea of
-- 24-byte entries, oldest first: the click's received time in ms (8 bytes, big-endian) and
-- its event id (16), so that byte order is (time, id) order. A batch merges its clicks into
-- a row by slicing and joining bytes (workers/consumer/bursts.py), where two arrays of
-- bigint and uuid were taken apart and built again in every statement. The windows still
-- open are copied at the upgrade. `click_windows` stays while a worker of schemas 18 to 20
-- may still write it (a rolling upgrade, a rollback): what such a worker merges after the
-- copy is not counted by this build's, so a count may fall short while both run, never
-- exceed. This build's worker deletes its rows once past their time, and an erasure its
-- person's in both tables.
CREATE TABLE IF NOT EXISTS burst_windows (
    link_id uuid NOT NULL,
    ip      inet NOT NULL,
    keep    integer NOT NULL,
    until   timestamptz NOT NULL,
    clicks  bytea NOT NULL,
    PRIMARY KEY (link_id, ip)
);
INSERT INTO burst_windows (link_id, ip, keep, until, clicks)
SELECT w.link_id, w.ip, w.keep, w.until,
       (SELECT string_agg(int8send(a) || uuid_send(i), ''::bytea ORDER BY a, i) FROM unnest(w.ats, w.ids) u (a, i))
FROM click_windows w
WHERE w.until > now() AND cardinality(w.ats) > 0
ON CONFLICT DO NOTHING;

-- Schema version 22: the do-not-track lists read by what changed. Every insert into and
-- delete from `suppressions` (a workspace's own, or its workspace's deletion) is logged in
-- `suppression_changes` by a statement trigger, numbered in commit order: the trigger
-- takes one advisory lock (held to the commit) before it numbers its rows, so a reader that
-- has read up to change n never meets a change below n committed later. An edge reads every
-- list once at its start (8 bytes of each digest, one byte string a workspace) and from then
-- on only the changes after the last one it read (ingest/privacy/suppressed.py). Changes
-- older than a day are deleted by the next change after them; `suppression_horizon` is the
-- highest deleted: an edge whose last change is below it reads every list again.
-- `suppressions_listing` serves GET /v1/suppressions, newest first, by page, and
-- `links_affiliate_created` GET /v1/affiliate/links the same way (every list the management
-- API answers comes by page or within ?limit=).
CREATE TABLE IF NOT EXISTS suppression_changes (
    seq          bigint PRIMARY KEY,
    workspace_id uuid NOT NULL,  -- no reference: a workspace's deletion is logged too
    digest       bytea NOT NULL,
    listed       boolean NOT NULL,
    at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS suppression_changes_at ON suppression_changes (at);
CREATE SEQUENCE IF NOT EXISTS suppression_change_seq;
CREATE TABLE IF NOT EXISTS suppression_horizon (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    seq       bigint NOT NULL
);
INSERT INTO suppression_horizon (seq) VALUES (0) ON CONFLICT DO NOTHING;
CREATE INDEX IF NOT EXISTS suppressions_listing ON suppressions (workspace_id, created_at DESC, digest DESC);
CREATE INDEX IF NOT EXISTS links_affiliate_created ON links (affiliate_id, created_at DESC, id DESC);

CREATE OR REPLACE FUNCTION suppressions_logged() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- one writer at a time, to its commit: change numbers are given in commit order
    -- (ingest/manage/suppressions.py takes the same lock first, for its cap)
    PERFORM pg_advisory_xact_lock(7526373237072);
    IF TG_OP = 'INSERT' THEN
        INSERT INTO suppression_changes (seq, workspace_id, digest, listed)
        SELECT nextval('suppression_change_seq'), a.workspace_id, a.digest, true FROM suppressions_added a;
    ELSE
        INSERT INTO suppression_changes (seq, workspace_id, digest, listed)
        SELECT nextval('suppression_change_seq'), r.workspace_id, r.digest, false FROM suppressions_removed r;
    END IF;
    WITH gone AS (DELETE FROM suppression_changes WHERE at < now() - interval '1 day' RETURNING seq)
    UPDATE suppression_horizon SET seq = greatest(suppression_horizon.seq, (SELECT max(seq) FROM gone))
    WHERE EXISTS (SELECT 1 FROM gone);
    RETURN NULL;
END
$$;
CREATE OR REPLACE TRIGGER suppressions_added AFTER INSERT ON suppressions
    REFERENCING NEW TABLE AS suppressions_added FOR EACH STATEMENT EXECUTE FUNCTION suppressions_logged();
CREATE OR REPLACE TRIGGER suppressions_removed AFTER DELETE ON suppressions
    REFERENCING OLD TABLE AS suppressions_removed FOR EACH STATEMENT EXECUTE FUNCTION suppressions_logged();

-- ---------------------------------------------------------------------------------------
-- Schema version 23: the click_burst rule judged after the batch's commit, not in its
-- transaction (workers/consumer/burst_pass.py). A batch's clicks the rule has yet to judge
-- are one row of `burst_pending` (their event ids), written by the batch's events insert
-- in its transaction; a pass deletes the rows it judges in its own transaction, with the
-- flags it writes (`event_flags`, by event id: a second judging writes nothing). A worker
-- that stops between the commit and the pass leaves the row for the next pass of any
-- worker. Bound: the batches committed since the last pass (each consumer passes every
-- second). The ids alone, no address: nothing here for an erasure to scrub. A row of up
-- to ~500 ids stays in its page (toast_tuple_target), not in a TOAST table.
-- A flag the workspace does not exclude is an `event_flags` row from here on; the rows of
-- schemas 18 to 22 keep theirs on the click's row (events.burst_clicks, burst_seconds).
CREATE TABLE IF NOT EXISTS burst_pending (
    id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    clicks uuid[] NOT NULL
);
ALTER TABLE burst_pending SET (toast_tuple_target = 8160);
ALTER TABLE burst_pending ALTER COLUMN clicks SET STORAGE EXTERNAL;

-- ---------------------------------------------------------------------------------------
-- Schema version 24: workspaces placed on several Postgres primaries (docs/shards.md).
-- The directory is DATABASE_URL's database, the shard named "default"; it alone reads
-- these tables (every shard carries them, empty). A workspace with no row here is on
-- "default": one Postgres works as before, with nothing written here. A shard's DSN is kept
-- without its password; the password, if any, sealed under REFSTREAM_SECRET_KEY.
CREATE TABLE IF NOT EXISTS shards (
    name            text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_-]{0,39}$' AND name <> 'default'),
    dsn             text NOT NULL,
    password_sealed bytea,
    added_at        timestamptz NOT NULL DEFAULT now()
);
-- where each workspace's rows are: written before the workspace's first row, on any shard
CREATE TABLE IF NOT EXISTS workspace_shards (
    workspace_id uuid PRIMARY KEY,
    shard        text NOT NULL,
    placed_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS workspace_shards_shard ON workspace_shards (shard);
-- a link's code is unique across every shard: claimed here before its row is written
CREATE TABLE IF NOT EXISTS link_codes (
    code         text PRIMARY KEY,
    workspace_id uuid NOT NULL
);
-- a workspace being moved to another shard (docs/shards.md, "Moving a workspace"): fenced
-- while its last changes are copied; `moved_to` on the source's row once the fence is up
-- there (its rows then frozen, read by no one, until `workspace move --drop-old`)
ALTER TABLE workspace_shards ADD COLUMN IF NOT EXISTS fenced boolean NOT NULL DEFAULT false;
ALTER TABLE workspaces ADD COLUMN IF NOT EXISTS moved_to text;
CREATE TABLE IF NOT EXISTS workspace_moves (
    workspace_id uuid PRIMARY KEY,
    source       text NOT NULL,
    target       text NOT NULL,
    -- copying -> fenced -> switched -> dropped; or, before the switch, aborted
    state        text NOT NULL DEFAULT 'copying'
                 CHECK (state IN ('copying', 'fenced', 'switched', 'dropped', 'aborted')),
    -- the oldest transaction the last copy's snapshot did not see: the next copy's start
    since_xid    bigint,
    copied       bigint NOT NULL DEFAULT 0,
    started_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- ---------------------------------------------------------------------------------------
-- Schema version 25: a pass's click_burst flags as one row per link and day, their event ids
-- in one array (workers/consumer/burst_pass.py), where schemas 23 and 24 wrote an
-- `event_flags` row of about 200 bytes, with its key, a flagged click. A flagged click's
-- evidence is its link's thresholds when judged (`clicks`, `seconds`; its count stops at
-- clicks + 1), the same for every click of the row: about 16 bytes a flagged click. An id
-- is flagged once: the pass reads the rows of its links whose ids' range overlaps its own
-- (by `burst_flags_link`, the first id beside the last: rows that do not overlap are passed
-- over in the index) and writes only ids none holds. Bound: the events' retention, by
-- `last_id` (workers/consumer/retention.py).
-- A flag the workspace excludes stays an `event_flags` row, as any other rule's; the rows
-- of schemas 23 and 24 keep theirs there; readers take every form.
CREATE TABLE IF NOT EXISTS burst_flags (
    last_id      uuid PRIMARY KEY,  -- the row's largest event id (an id is in one row only)
    first_id     uuid NOT NULL,     -- and its smallest
    workspace_id uuid NOT NULL,
    link_id      uuid NOT NULL,
    clicks       integer NOT NULL,  -- the threshold crossed: more than this many clicks ...
    seconds      integer NOT NULL,  -- ... from the click's address on its link within this
    ids          uuid[] NOT NULL    -- in id order, at most 480 (a row stays in its page)
);
CREATE INDEX IF NOT EXISTS burst_flags_link ON burst_flags (link_id, last_id) INCLUDE (first_id);
ALTER TABLE burst_flags SET (toast_tuple_target = 8160);
ALTER TABLE burst_flags ALTER COLUMN ids SET STORAGE EXTERNAL;
-- Every click_burst flag, in whichever form it was written, as an event_flags row reads:
-- (event id, workspace, excluded, evidence). For reading (an operator's question, a test),
-- not for a hot path: the schemas 18 to 22 branch scans the events.
CREATE OR REPLACE VIEW click_burst_flags AS
SELECT i AS event_id, workspace_id, false AS excluded,
       jsonb_build_object('clicks', clicks + 1, 'threshold_clicks', clicks, 'window_seconds', seconds) AS evidence
FROM burst_flags CROSS JOIN LATERAL unnest(ids) AS i
UNION ALL
SELECT event_id, workspace_id, excluded, evidence FROM event_flags WHERE rule = 'click_burst'
UNION ALL
SELECT event_id, workspace_id, false,
       jsonb_build_object('clicks', burst_clicks + 1, 'threshold_clicks', burst_clicks, 'window_seconds', burst_seconds)
FROM events WHERE burst_clicks IS NOT NULL;

-- ---------------------------------------------------------------------------------------
-- Schema version 26: a link's events by the link's 8-byte key. `events_link_received` (link_id,
-- received_at) was a click's second largest index: 71 bytes a click in part (cap), its
-- pages half full. Each link's entries grow at their own right end, between other links',
-- so a full page splits in the middle and its left half is never written again; Postgres
-- packs such pages (a split after the new entry) only for entries of at most two 8-byte
-- keys, and a uuid is 16. `events_link_key_received` is on (uuid_hash_extended(link_id, 0),
-- received_at): the link's key, then the time. Its pages fill: 34 bytes a click there.
-- Every read by link names both, the keys (the index's condition) and the ids (two links
-- of one key are told apart on the row): ingest/contract/link_keys.py. Built online
-- (ingest/manage/online.py) where `events_link_received` holds rows, which is dropped
-- once the new one is valid; on a new database, made at once. The rollback is
-- docs/operations.md "Migrating to schema 26".
DO $online$
BEGIN
    IF to_regclass('events_link_key_received') IS NULL THEN
        IF to_regclass('events_link_received') IS NOT NULL AND EXISTS (SELECT 1 FROM events) THEN
            CREATE INDEX events_link_key_received ON ONLY events (uuid_hash_extended(link_id, 0), received_at);
        ELSE
            DROP INDEX IF EXISTS events_link_received;
            CREATE INDEX events_link_key_received ON events (uuid_hash_extended(link_id, 0), received_at);
        END IF;
    END IF;
END
$online$;

-- Schema version 26, too: a referrer's domain from the row's referrer. An enriched click's
-- `enrichment` kept its referrer's domain (38 bytes a click in part (cap), most of the
-- document), which the `referrer` column beside it gives again for a plain URL. The worker
-- writes the domain into the row only where `referrer_domain(referrer)` would not give the
-- worker's own (a null included; ingest/contract/referrers.py holds the same pattern), and
-- `event_enrichment(doc, device, place, ip, country, asn, is_bot, referrer)` puts it back: a
-- row of a device (enriched) without the key reads the derived one. A row written before
-- has the key wherever its domain was not null, and reads as it is; where it was null, its
-- referrer matches no pattern either. An erasure, which clears the referrer, writes the
-- domain into the row first (ingest/privacy/erasure_rows.py), as it kept it before.
CREATE OR REPLACE FUNCTION referrer_domain(referrer text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT substring(referrer FROM '^https?://(?:www\.)?([a-z0-9-]+(?:\.[a-z0-9-]+)*)(?::[0-9]{1,5})?(?:[/?#]|$)')
$$;
CREATE OR REPLACE FUNCTION event_enrichment(doc jsonb, device integer, place integer, ip inet, country text,
                                            asn integer, is_bot boolean, referrer text) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN device IS NULL OR coalesce(doc ? 'referrer_domain', false) THEN x.e
                ELSE x.e || jsonb_build_object('referrer_domain', referrer_domain(referrer)) END
    FROM (SELECT event_enrichment(doc, device, place, ip, country, asn, is_bot) AS e) x
$$;
