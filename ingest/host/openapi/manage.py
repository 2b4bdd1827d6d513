"""The management API's routes in ``/openapi.json`` (a workspace's or an affiliate's bearer key):
programs, affiliates, links, keys, the workspace, stats, sales, commissions and payouts, events,
customers, privacy (erasures, suppressions), webhooks, and an affiliate's own reads.
"""

from __future__ import annotations

from ingest.contract.fields import IDENT
from ingest.host.openapi.common import BODY, Op, errors
from ingest.manage.routes import commissions as C
from ingest.manage.routes import keys, links, privacy, reads, webhooks
from ingest.manage.routes import stats as S
from ingest.manage.routes._guard import ManageError

MANAGE = errors(ManageError, 400, 401, 403, 404, 429, 503)
MANAGE_BODY = {**MANAGE, **errors(ManageError, *BODY)}
LIMIT = {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}
DAY = {"type": "string", "format": "date", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}  # a UTC day, YYYY-MM-DD
CURRENCY = {"type": "string", "pattern": "^[a-z]{3}$"}  # ISO 4217, lower case
CUSTOMER = {"type": "string", "maxLength": 256, "pattern": IDENT}  # an external id
SEQ = {"type": "string", "pattern": "^[0-9]{1,18}$"}  # a ledger list's cursor

OPERATIONS: tuple[Op, ...] = (
    Op(
        "post",
        "/v1/programs",
        "Create a program",
        "Management",
        {201: links.Program, **MANAGE_BODY},
        links.NewProgram,
        "bearer",
    ),
    Op(
        "post",
        "/v1/affiliates",
        "Create an affiliate",
        "Management",
        {201: links.Affiliate, 409: ManageError, **MANAGE_BODY},
        links.NewAffiliate,
        "bearer",
    ),
    Op(
        "post",
        "/v1/links",
        "Create a link",
        "Management",
        {201: links.Link, 409: ManageError, **MANAGE_BODY},
        links.NewLink,
        "bearer",
    ),
    Op(
        "post",
        "/v1/keys",
        "Create an API key (scope *); the key is shown once",
        "Management",
        {201: keys.CreatedKey, **MANAGE_BODY},
        keys.NewKey,
        "bearer",
    ),
    Op(
        "delete",
        "/v1/keys/{prefix}",
        "Revoke an API key (scope *)",
        "Management",
        {200: keys.RevokedKey, **MANAGE},
        security="bearer",
    ),
    Op(
        "patch",
        "/v1/workspace",
        "Change the calling key's workspace: bot_policy (exclude | count), fraud_policy (per rule: flag | exclude)",
        "Management",
        {200: links.Workspace, **MANAGE_BODY},
        links.WorkspacePatch,
        "bearer",
    ),
    Op(
        "patch",
        "/v1/links/{id}",
        "Change a link's status or URL",
        "Management",
        {200: links.Link, **MANAGE_BODY},
        links.LinkPatch,
        "bearer",
    ),
    Op(
        "get",
        "/v1/links/{id}",
        "A link with its counters",
        "Management",
        {200: links.Link, **MANAGE},
        security="bearer",
    ),
    Op(
        "get",
        "/v1/links/{id}/stats",
        "A link's counted events, sales and revenue per currency, dropped events by "
        "reason and fraud flags by rule, "
        "per UTC day (from, to: YYYY-MM-DD, at most 366 days; default the last 30)",
        "Management",
        {200: S.LinkStats, **MANAGE},
        security="bearer",
        query={"from": DAY, "to": DAY},
    ),
    Op(
        "get",
        "/v1/conversions",
        "The workspace's sales, newest first: of a link, an affiliate or a customer "
        "(its external id); `before` is the `next` of the page before",
        "Management",
        {200: reads.SaleList, **MANAGE},
        security="bearer",
        query={
            "link_id": {"type": "string"},
            "affiliate_id": {"type": "string"},
            "customer_id": CUSTOMER,
            "before": {"type": "string"},
            "limit": LIMIT,
        },
    ),
    Op(
        "patch",
        "/v1/programs/{id}/commission",
        "Change a program's commission rules (the others kept): sale_bps, "
        "sale_flat (per currency), lead_flat, lead_currency, lead_events, duration (lifetime, months, first_sale), "
        "duration_months, hold_days",
        "Management",
        {200: C.ProgramCommission, **MANAGE_BODY},
        C.CommissionRules,
        "bearer",
    ),
    Op(
        "get",
        "/v1/commissions",
        "The commission ledger, newest first: by affiliate, program, status or currency; "
        "`before` is the `next` of the page before",
        "Management",
        {200: C.CommissionList, **MANAGE},
        security="bearer",
        query={
            "affiliate_id": {"type": "string"},
            "program_id": {"type": "string"},
            "status": {"type": "string", "enum": ["pending", "approved", "paid"]},
            "currency": CURRENCY,
            "before": SEQ,
            "limit": LIMIT,
        },
    ),
    Op(
        "get",
        "/v1/affiliate/commissions",
        "The calling affiliate's own commissions (an affiliate key)",
        "Affiliate",
        {200: C.CommissionList, **MANAGE},
        security="bearer",
        query={
            "program_id": {"type": "string"},
            "status": {"type": "string", "enum": ["pending", "approved", "paid"]},
            "currency": CURRENCY,
            "before": SEQ,
            "limit": LIMIT,
        },
    ),
    Op(
        "post",
        "/v1/payouts",
        "A payout of an affiliate's approved, unpaid commissions in one currency (reversals "
        "included); 409 when they sum to nothing",
        "Management",
        {201: C.Payout, 409: ManageError, **MANAGE_BODY},
        C.NewPayout,
        "bearer",
    ),
    Op(
        "post",
        "/v1/payouts/{id}/paid",
        "Mark a payout, and its commissions, paid",
        "Management",
        {200: C.Payout, **MANAGE},
        security="bearer",
    ),
    Op(
        "get",
        "/v1/payouts",
        "Payouts, newest first: by affiliate, status or currency",
        "Management",
        {200: C.PayoutList, **MANAGE},
        security="bearer",
        query={
            "affiliate_id": {"type": "string"},
            "status": {"type": "string", "enum": ["pending", "paid"]},
            "currency": CURRENCY,
            "before": SEQ,
            "limit": LIMIT,
        },
    ),
    Op(
        "get",
        "/v1/affiliate/payouts",
        "The calling affiliate's own payouts (an affiliate key)",
        "Affiliate",
        {200: C.PayoutList, **MANAGE},
        security="bearer",
        query={
            "status": {"type": "string", "enum": ["pending", "paid"]},
            "currency": CURRENCY,
            "before": SEQ,
            "limit": LIMIT,
        },
    ),
    Op(
        "get",
        "/v1/stats",
        "The workspace's counted events, sales and revenue per currency, dropped events by "
        "reason (with those no link resolved for: unknown codes, sales credited to no affiliate) and fraud flags by "
        "rule, per UTC day (from, to as a link's)",
        "Management",
        {200: S.WorkspaceStats, **MANAGE},
        security="bearer",
        query={"from": DAY, "to": DAY},
    ),
    Op(
        "patch",
        "/v1/programs/{id}/fraud",
        "Change a program's fraud thresholds (burst_clicks, burst_seconds, fast_conversion_seconds)",
        "Management",
        {200: S.ProgramFraud, **MANAGE_BODY},
        S.FraudThresholds,
        "bearer",
    ),
    Op(
        "get",
        "/v1/events",
        "Recent events with their enrichment",
        "Management",
        {200: reads.EventList, **MANAGE},
        security="bearer",
        query={
            "link_id": {"type": "string"},
            "type": {"type": "string", "enum": ["click", "lead", "conversion"]},
            "limit": LIMIT,
        },
    ),
    Op(
        "get",
        "/v1/customers/{external_id}",
        "A customer by your external id",
        "Management",
        {200: reads.Customer, **MANAGE},
        security="bearer",
    ),
    Op(
        "delete",
        "/v1/customers/{external_id}",
        "Erase a customer's personal data everywhere (scope erase, "
        "which * does not grant): Postgres at once, Redis and the archive by the workers; counters keep their "
        "numbers",
        "Management",
        {202: privacy.Erasure, **MANAGE},
        security="bearer",
    ),
    Op(
        "delete",
        "/v1/affiliates/{id}",
        "Erase an affiliate's personal data everywhere (scope erase): name, email, "
        "external id and addresses; their links, commissions and payouts stay",
        "Management",
        {202: privacy.AffiliateErasures, **MANAGE},
        security="bearer",
    ),
    Op(
        "delete",
        "/v1/participants/{participant_id}",
        "Erase a Bricqs participant (the affiliate of that external id "
        "in every campaign) as an affiliate (scope erase)",
        "Management",
        {202: privacy.AffiliateErasures, **MANAGE},
        security="bearer",
    ),
    Op(
        "post",
        "/v1/suppressions",
        "Do not track a visitor, customer or address: their events are answered as "
        "usual, stored nowhere and counted as suppressed drops (the list keeps digests, never values); a workspace "
        "lists at most REFSTREAM_SUPPRESSION_MAX entries (409 limit_reached past it)",
        "Management",
        {201: privacy.Suppression, 409: ManageError, **MANAGE_BODY},
        privacy.NewSuppression,
        "bearer",
    ),
    Op(
        "get",
        "/v1/suppressions",
        "The workspace's do-not-track list (kinds and dates; no values), newest first, by page",
        "Management",
        {200: privacy.SuppressionList, **MANAGE},
        security="bearer",
        query={"before": {"type": "string", "pattern": "^[0-9]{1,20}-[0-9a-f]{32}$"}, "limit": LIMIT},
    ),
    Op(
        "delete",
        "/v1/suppressions/{id}",
        "Track a listed visitor, customer or address again",
        "Management",
        {204: None, **MANAGE},
        security="bearer",
    ),
    Op(
        "get",
        "/v1/erasures/{id}",
        "An erasure: what is still pending, and its archive deadline (scope erase)",
        "Management",
        {200: privacy.Erasure, **MANAGE},
        security="bearer",
    ),
    Op(
        "post",
        "/v1/webhooks",
        "Create a webhook (lead.created, conversion.created, milestone.reached, "
        "fraud.flagged) to a public address; its signing secret is shown once",
        "Webhooks",
        {201: webhooks.Webhook, 409: ManageError, **MANAGE_BODY},
        webhooks.NewWebhook,
        "bearer",
    ),
    Op(
        "get",
        "/v1/webhooks/{id}/deliveries",
        "A webhook's deliveries with every attempt",
        "Webhooks",
        {200: webhooks.DeliveryList, **MANAGE},
        security="bearer",
        query={"limit": LIMIT},
    ),
    Op(
        "get",
        "/v1/affiliate/links",
        "The calling affiliate's links (affiliate key), newest first, by page",
        "Affiliate",
        {200: links.LinkList, **MANAGE},
        security="bearer",
        query={"before": {"type": "string", "format": "uuid"}, "limit": LIMIT},
    ),
    Op(
        "get",
        "/v1/affiliate/stats",
        "The calling affiliate's stats, its own links only: counted, dropped by "
        "reason, flagged by rule, sales, revenue, refunds and commission per currency, per UTC day (affiliate key;"
        " from, to as a link's stats)",
        "Affiliate",
        {200: S.AffiliateStats, **MANAGE},
        security="bearer",
        query={"from": DAY, "to": DAY},
    ),
)
