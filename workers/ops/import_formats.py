"""What ``refstream import`` reads: rows of history, each a ``Row`` or a ``Bad`` one.

refstream's own form is one object per row, as NDJSON (one JSON object a line) or CSV (a
header row, then one row a line; empty cells are absent, ``metadata`` is JSON text). Every
row has a ``type`` (``click``, ``lead``, ``sale`` or ``refund``), an ``id`` (the source's
own id of the row: the event id is derived from it, so the same row imported twice is
stored once) and a ``timestamp`` (ISO 8601, naive means UTC, or Unix time in seconds,
milliseconds, microseconds or nanoseconds, told apart by magnitude); then, by type:

- click: ``link`` (the link's code), ``ip``, ``user_agent``, ``referrer``, ``visitor_id``;
- lead: ``customer_id``, ``event_name`` (``Sign Up``), ``click`` (the source id of a click
  the same source imported: its link, click id and visitor follow) or ``link``, ``email``,
  ``customer_name``, ``avatar``, ``metadata``;
- sale: ``customer_id``, ``amount`` (an integer in the currency's minor unit), ``currency``
  (``usd``), ``invoice_id``, ``event_name`` (``Purchase``), ``payment_processor``
  (``custom``), ``lead_event_name``, ``metadata``;
- refund: ``invoice_id``, ``amount`` (none: what is left of the sale), ``refund_id`` (its
  key; else the row's ``id``), ``reason``.

Another system's export is read by a reader: a function from the file's lines
(``import_lines``: numbered, bounded, UTF-8) to rows in this form (``READERS``; ``dub`` is
one, docs/import.md). A converter plugs in by adding one. Every reader goes on past a row it
refuses, and every refusal names the line its row starts on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from ingest.contract.bounds import MAX_KEYS, BoundsError, check
from ingest.contract.fields import (
    MAX_AMOUNT,
    Currency,
    ExternalId,
    Ident,
    Integer,
    Metadata,
    NoNul,
    OrderId,
    Processor,
    RecordId,
    VisitorId,
    no_ones,
    someones,
)
from workers.ops import import_csv
from workers.ops.import_lines import MAX_LINE, Bad, Line

__all__ = ["KINDS", "MAX_LINE", "READERS", "Bad", "Row", "guess", "row", "timestamp_ms"]

KINDS = ("click", "lead", "sale", "refund")


@dataclass(frozen=True, slots=True)
class Row:
    line: int  # where it was read (1 is the first line; a CSV's header is line 1)
    kind: str
    id: str  # the source's id of the row
    at_ms: int
    fields: dict[str, Any]  # the type's fields, validated; absent ones left out


Reader = Callable[[Iterable[Line | Bad]], Iterator["Row | Bad"]]


# the source's id of a row keys it (its event id, the click's map): a placeholder is refused
RowId = Annotated[Ident, AfterValidator(someones)]
# an id a row may do without (the click a lead names, a refund's key): a placeholder is none
OptionalRef = Annotated[Ident | None, AfterValidator(no_ones)]


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: RowId = Field(min_length=1, max_length=256)


class _Click(_Common):
    link: Ident = Field(min_length=1, max_length=256)
    ip: NoNul | None = Field(None, max_length=64)
    user_agent: NoNul | None = Field(None, max_length=1024)
    referrer: NoNul | None = Field(None, max_length=2048)
    visitor_id: VisitorId = Field(None, max_length=256)  # as the click routes take it


class _Lead(_Common):
    customer_id: ExternalId = Field(min_length=1, max_length=256)
    event_name: NoNul = Field("Sign Up", min_length=1, max_length=256)
    click: OptionalRef = Field(None, min_length=1, max_length=256)  # a placeholder: its link then
    link: Ident | None = Field(None, min_length=1, max_length=256)
    email: NoNul | None = Field(None, max_length=320)
    customer_name: NoNul | None = Field(None, max_length=256)
    avatar: NoNul | None = Field(None, max_length=2048)
    metadata: Metadata | None = Field(None, max_length=MAX_KEYS)


class _Sale(_Common):
    customer_id: ExternalId = Field(min_length=1, max_length=256)
    amount: Integer = Field(ge=0, le=MAX_AMOUNT)
    currency: Currency = "usd"
    invoice_id: OrderId = Field(None, min_length=1, max_length=256)
    event_name: NoNul = Field("Purchase", min_length=1, max_length=256)
    payment_processor: Processor = "custom"
    lead_event_name: NoNul | None = Field(None, min_length=1, max_length=256)
    metadata: Metadata | None = Field(None, max_length=MAX_KEYS)


class _Refund(_Common):
    invoice_id: RecordId = Field(min_length=1, max_length=256)
    amount: Integer | None = Field(None, ge=1, le=MAX_AMOUNT)
    refund_id: OptionalRef = Field(None, min_length=1, max_length=256)  # a placeholder: the row's id
    reason: NoNul | None = Field(None, max_length=512)


_MODELS: dict[str, type[_Common]] = {"click": _Click, "lead": _Lead, "sale": _Sale, "refund": _Refund}


# Unix time's unit told by its magnitude: below 1e11 seconds (up to the year 5138), below 1e14
# milliseconds, below 1e17 microseconds, below 1e20 nanoseconds (each up to the same year)
_UNITS = ((1e11, 1000, 1), (1e14, 1, 1), (1e17, 1, 1000), (1e20, 1, 1_000_000))  # below, times, divided by


def timestamp_ms(value: Any) -> int:
    """Milliseconds since the epoch of ISO 8601 (naive: UTC) or Unix time in s, ms, µs or
    ns (a number or its digits), its unit told by its magnitude; ValueError otherwise."""
    number: float | int | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    elif not isinstance(value, str):
        raise ValueError("timestamp: an ISO 8601 datetime or Unix time (s, ms, µs or ns)")
    if number is not None:
        if not math.isfinite(number) or number <= 0:
            raise ValueError(f"timestamp: {str(value)[:40]} is not a time after 1970")
        for below, times, divided_by in _UNITS:
            if number < below:
                return int(number * times) // divided_by
        raise ValueError(f"timestamp: {str(value)[:40]} is too large for Unix time in s, ms, µs or ns")
    try:
        at = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"timestamp: not ISO 8601: {value[:40]!r}") from None
    at = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    return int(at.timestamp() * 1000)


def row(line: int, d: Any) -> Row | Bad:
    """One object in refstream's form, validated by its type."""
    if not isinstance(d, dict):
        return Bad(line, "invalid", "not an object")
    try:
        check(d)  # the bounds every door keeps (ingest.contract.bounds)
    except BoundsError as exc:
        return Bad(line, "invalid", str(exc))
    kind = d.get("type")
    model = _MODELS.get(kind) if isinstance(kind, str) else None
    if model is None:
        return Bad(line, "invalid", f"type: one of {', '.join(KINDS)}")
    try:
        at_ms = timestamp_ms(d.get("timestamp"))
        fields = model.model_validate(d).model_dump(exclude_none=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "row"
        return Bad(line, "invalid", f"{where}: {first['msg']}")
    except ValueError as exc:
        return Bad(line, "invalid", str(exc))
    source_id = fields.pop("id")
    return Row(line, kind, source_id, at_ms, fields)  # type: ignore[arg-type]


def ndjson(lines: Iterable[Line | Bad]) -> Iterator[Row | Bad]:
    for line in lines:
        if isinstance(line, Bad):
            yield line
            continue
        if not line.text.strip():
            continue
        try:
            d = orjson.loads(line.text)
        except orjson.JSONDecodeError as exc:
            yield Bad(line.number, "invalid", f"not JSON: {exc}")
            continue
        yield row(line.number, d)


def csv_rows(lines: Iterable[Line | Bad]) -> Iterator[Row | Bad]:
    """A header row, then rows (``import_csv``); an empty cell is an absent field; ``amount``
    is digits and ``metadata`` JSON text."""
    for r in import_csv.records(lines):
        if isinstance(r, Bad):
            yield r
            continue
        n, cells = r
        d: dict[str, Any] = dict(cells)
        try:
            if "amount" in d:
                if not str(d["amount"]).strip().isdigit():
                    raise ValueError(f"amount: an integer in the currency's minor unit, not {d['amount'][:20]!r}")
                d["amount"] = int(d["amount"])
            if "metadata" in d:
                d["metadata"] = orjson.loads(d["metadata"])
        except (ValueError, orjson.JSONDecodeError) as exc:
            yield Bad(n, "invalid", str(exc))
            continue
        yield row(n, d)


def dub(lines: Iterable[Line | Bad]) -> Iterator[Row | Bad]:
    """Dub's events export (which Refport's API follows): NDJSON of the event objects its
    events API lists, ``{"event": "click" | "lead" | "sale", "timestamp", "click": {...},
    "link": {...}, "customer": {...}, "sale": {...}}``. A click's id is ``click.id``; a lead
    names its click by ``click.id`` and its customer by ``customer.externalId``; a sale is
    ``sale.amount`` (cents), ``sale.invoiceId``, ``sale.paymentProcessor``."""
    for line in lines:
        if isinstance(line, Bad):
            yield line
            continue
        if not line.text.strip():
            continue
        n = line.number
        try:
            e = orjson.loads(line.text)
            yield row(n, _from_dub(e))
        except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError) as exc:
            yield Bad(n, "invalid", f"not a Dub event: {type(exc).__name__}: {exc}")


def _from_dub(e: dict[str, Any]) -> dict[str, Any]:
    kind = e["event"]
    click, link, customer = e.get("click") or {}, e.get("link") or {}, e.get("customer") or {}
    out: dict[str, Any] = {"timestamp": e.get("timestamp")}
    if kind == "click":
        out.update(
            type="click",
            id=click["id"],
            link=link.get("key"),
            ip=click.get("ip"),
            user_agent=click.get("ua"),
            referrer=click.get("refererUrl") or click.get("referer"),
        )
    elif kind == "lead":
        out.update(
            type="lead",
            id=e.get("eventId") or f"{click.get('id')}:{customer.get('externalId')}",
            customer_id=customer.get("externalId"),
            event_name=e.get("eventName") or "Sign Up",
            click=click.get("id"),
            link=link.get("key"),
            email=customer.get("email"),
            customer_name=customer.get("name"),
            avatar=customer.get("avatar"),
            metadata=e.get("metadata"),
        )
    elif kind == "sale":
        sale = e["sale"]
        out.update(
            type="sale",
            id=e.get("eventId") or sale.get("invoiceId"),
            customer_id=customer.get("externalId"),
            amount=sale.get("amount"),
            currency=sale.get("currency") or "usd",
            invoice_id=sale.get("invoiceId"),
            event_name=e.get("eventName") or "Purchase",
            payment_processor=sale.get("paymentProcessor") or "custom",
            metadata=e.get("metadata"),
        )
    else:
        return {"type": kind}
    return {k: v for k, v in out.items() if v is not None}


READERS: dict[str, Reader] = {"ndjson": ndjson, "csv": csv_rows, "dub": dub}
Format = Literal["ndjson", "csv", "dub"]


def guess(name: str) -> str:
    """The format a file's name suggests: ``.csv`` is CSV, anything else NDJSON."""
    return "csv" if name.lower().endswith(".csv") else "ndjson"
