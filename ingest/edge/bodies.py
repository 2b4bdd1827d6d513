"""The request bodies more than one route takes: a dialect's own route and the batch
route's item of the same type (a sale's are in ``ingest.edge.sale``). Each model is the
dialect's documented fields; what a body may hold at all is bounded by
``ingest.contract.bounds`` and typed by ``ingest.contract.fields``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ingest.contract.bounds import MAX_KEYS
from ingest.contract.events import uuid7
from ingest.contract.fields import ExternalId, Metadata, NoNul, SessionId, VisitorId

# an Affixo click's fingerprint match: how long a fingerprint names its visitor, and the
# confidence an answer found by it reports
FINGERPRINT_TTL_S = 90 * 86400
FINGERPRINT_CONFIDENCE = 0.8


class AffixoClick(BaseModel):
    model_config = ConfigDict(extra="ignore")
    ref: NoNul = Field(min_length=1, max_length=128, description="Referral code / ref_param.")
    visitor_id: VisitorId = Field(None, max_length=128)
    fingerprint: NoNul | None = Field(None, max_length=1024)
    url: NoNul | None = Field(None, max_length=2048)
    referrer: NoNul | None = Field(None, max_length=2048)


def new_visitor_id() -> str:
    """A visitor for an Affixo click that names none (or a placeholder)."""
    return "v_" + uuid7().hex


class RefportLead(BaseModel):
    model_config = ConfigDict(extra="ignore")
    clickId: NoNul = Field(min_length=1, max_length=128)
    eventName: NoNul = Field(min_length=1, max_length=256)
    customerExternalId: ExternalId = Field(min_length=1, max_length=256)
    customerEmail: str | None = Field(None, max_length=320, pattern=r"^[^@\s\x00]+@[^@\s\x00]+\.[^@\s\x00]+$")
    customerName: NoNul | None = Field(None, max_length=256)
    customerAvatar: NoNul | None = Field(None, max_length=2048)
    metadata: Metadata | None = Field(None, max_length=MAX_KEYS)


class BricqsConvert(BaseModel):
    model_config = ConfigDict(extra="ignore")
    code: NoNul = Field(min_length=1, max_length=128)
    referred_session_id: SessionId = Field(min_length=1, max_length=256)
