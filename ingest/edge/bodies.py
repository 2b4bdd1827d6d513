"""The request bodies more than one route takes: a dialect's own route and the batch
route's item of the same type (a sale's are in ``ingest.edge.sale``). Each model is the
dialect's documented fields; what a body may hold at all is bounded by
``ingest.contract.bounds`` and typed by ``ingest.contract.fields``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ingest.contract.bounds import MAX_KEYS
from ingest.contract.events import uuid7
from ingest.contract.fields import ExternalId, Integer, Metadata, NoNul, OptionalId, SessionId, VisitorId

# an Affixo click's fingerprint match: how long a fingerprint names its visitor, and the
# confidence an answer found by it reports
FINGERPRINT_TTL_S = 90 * 86400
FINGERPRINT_CONFIDENCE = 0.8


class AffixoClick(BaseModel):
    model_config = ConfigDict(extra="ignore")
    ref: NoNul = Field(min_length=1, max_length=128, description="Referral code / ref_param.")
    visitor_id: VisitorId = Field(None, max_length=128)
    # a placeholder ("undefined", "null") is taken as none: it would hand every browser that
    # sends it the first one's visitor
    fingerprint: OptionalId = Field(None, max_length=1024)
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


# a lead's eventQuantity: the lead counts this many times (Dub's "N seats of a trial")
MAX_QUANTITY = 1000
LeadMode = Literal["async", "wait", "deferred"]
# the names Dub's API took the customer's external id by before ``customerExternalId``
OLD_EXTERNAL_ID_NAMES = ("externalId", "customerId")


def customer_aliases(data: Any) -> Any:
    """A body that names its customer only by one of Dub's older names (``externalId``,
    ``customerId``) names it by ``customerExternalId``; the current name wins when it is
    given and not empty."""
    if isinstance(data, dict) and not data.get("customerExternalId"):
        for old in OLD_EXTERNAL_ID_NAMES:
            value = data.get(old)
            if isinstance(value, str) and value:
                return {**data, "customerExternalId": value}
    return data


def no_default(schema: dict[str, Any]) -> None:
    """A field required after its older names are read: its schema shows no default."""
    schema.pop("default", None)


class TrackLead(RefportLead):
    """A lead on Dub's ``POST /track/lead`` and on Refport's ``POST /api/track/lead`` (the
    same API, field for field): Refport's fields, and what Dub's SDKs also send."""

    clickId: NoNul | None = Field(  # type: ignore[assignment]
        None,
        max_length=128,
        description="The click's id; empty or absent: the click of this customer's earlier lead (deferred tracking)",
    )
    customerExternalId: ExternalId = Field(  # type: ignore[assignment]
        None,  # checked once its older names are read (_named)
        max_length=256,
        description="Required, here or by one of its older names (externalId, customerId)",
        json_schema_extra=no_default,
    )
    externalId: str | None = Field(None, deprecated=True, description="customerExternalId's older name")
    customerId: str | None = Field(None, deprecated=True, description="customerExternalId's older name")
    mode: LeadMode = Field("async", description="async and wait are the same here; deferred records no lead yet")
    eventQuantity: Integer | None = Field(None, ge=1, le=MAX_QUANTITY, description="The lead counts this many times")

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        return customer_aliases(data)

    @model_validator(mode="after")
    def _named(self) -> TrackLead:
        if not self.customerExternalId:
            raise ValueError("customerExternalId is required")
        return self

    @property
    def quantity(self) -> int:
        return self.eventQuantity or 1


class BricqsConvert(BaseModel):
    model_config = ConfigDict(extra="ignore")
    code: NoNul = Field(min_length=1, max_length=128)
    referred_session_id: SessionId = Field(min_length=1, max_length=256)
