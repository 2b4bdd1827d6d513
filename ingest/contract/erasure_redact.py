"""A person taken out of what is not an event row (``ingest.contract.erasure``): an event's
extra commands and its idempotency answer fit for its scrub (``scrub_commands``,
``scrub_answer``), and a JSON document about the person's event without them, by identity
(``redact_person``) or by value (``redact``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from ingest.contract.erasure_ids import PERSONAL
from ingest.contract.events import Envelope


def _changed(before: Envelope, after: Envelope) -> dict[str, str | None]:
    """What ``after`` (the scrub of ``before``) took out: each value, and what it became."""
    values: dict[str, str | None] = {v: None for v in (before.ip, before.user_agent) if v}
    for k, v in before.payload.items():
        if isinstance(v, str) and v and after.payload.get(k) != v:
            values[v] = after.payload.get(k) if isinstance(after.payload.get(k), str) else None
    return values


def scrub_commands(commands: Iterable[tuple[Any, ...]], before: Envelope, after: Envelope) -> list[tuple[Any, ...]]:
    """An event's extra commands (a spooled click's cache entry, an Affixo fingerprint's
    visitor: ``ingest.spool``) fit for ``after``, the scrub of ``before``: a JSON argument
    (the click cache's entry) has the values the scrub took out as they became (the visitor
    as its pseudonym); a command holding one of them bare (the fingerprint cache, which would
    hand the erased visitor to the next click) is not sent."""
    values = _changed(before, after)
    out = []
    for command in commands:
        args: list[Any] = []
        for a in command:
            text = a.decode(errors="replace") if isinstance(a, bytes) else a
            if isinstance(text, str) and text in values:
                break
            if isinstance(a, bytes | str) and text[:1] in ("{", "["):
                try:
                    doc = orjson.loads(a)
                except orjson.JSONDecodeError:
                    args.append(a)
                    continue
                new = orjson.dumps(redact(doc, values))
                args.append(new if isinstance(a, bytes) else new.decode())
                continue
            args.append(a)
        else:
            out.append(tuple(args))
    return out


def scrub_answer(answer: bytes, before: Envelope, after: Envelope) -> bytes:
    """An idempotency answer (fingerprint, status, JSON body: ``ingest.edge.idempotency``)
    for ``before``, without what its scrub (``after``) took out: a repeat of the request
    is still answered, and appends nothing."""
    head, body = answer[:35], answer[35:]
    ids = {v: new for v, new in _changed(before, after).items() if isinstance(new, str)}
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return answer
    # the answer is the event's, the person's (their fields go, by identity: never another
    # string equal to one of theirs); as deep as the answer orjson wrote at the edge
    return head + orjson.dumps(redact_person(doc, ids, hers=True))


# A person's fields in a document about their event (a webhook payload, fraud evidence, an
# idempotency answer), by identity: where they sit, never a string equal to one of theirs
# elsewhere (an invoice id equal to their customer id, a customer named as the affiliate).
# Their ids (each becomes its pseudonym where it is one of theirs) ...
PERSON_IDS = frozenset(
    {
        "external_id",
        "externalId",
        "customer_external_id",
        "customerExternalId",
        "customer_id",
        "customerId",
        "visitor_id",
        "visitorId",
        "referred_session_id",
    }
)
# ... the event's own data about them (each goes) ...
PERSON_DATA = PERSONAL | {
    "ip",
    "user_agent",
    "agent",
    "phone",
    "address",
    "avatar_url",
    "customer_email",
    "customerEmail",
    "customerName",
    "customerAvatar",
}
# ... their customer object's (a name there is theirs) ...
CUSTOMER_DATA = PERSON_DATA | {"name"}
# ... and the objects that are someone else's, whoever's event holds them: the link, its
# affiliate, its program (an affiliate's fields beside a customer's, a self-referral's
# ``affiliate_email``, are the affiliate's: their own erasure takes them)
OTHERS = frozenset({"link", "affiliate", "partner", "program", "milestone"})


def redact_person(doc: Any, ids: Mapping[str, str], *, hers: bool = False) -> Any:
    """A JSON document without the person whose ids (raw, to their pseudonyms) are ``ids``,
    by identity: an object that names them in one of its id fields (``PERSON_IDS``, its
    ``customer`` object), or every object of ``doc`` when ``hers`` (a webhook payload or
    fraud evidence of the person's own event), has those ids as their pseudonyms and its
    ``PERSON_DATA`` emptied, and its ``customer`` object the person's: every id of theirs
    a pseudonym, its ``CUSTOMER_DATA`` emptied. The link's, the affiliate's and the
    program's objects (``OTHERS``) are never the person's. In a list, each item is its own
    (a batch's answer holds other people's items) unless the whole is ``hers``."""
    if isinstance(doc, list):
        return [redact_person(v, ids, hers=hers) for v in doc]
    if not isinstance(doc, dict):
        return doc
    hers = hers or _names_person(doc, ids)
    if not hers:
        return {k: v if k in OTHERS else redact_person(v, ids) for k, v in doc.items()}
    out: dict[str, Any] = {}
    for k, v in doc.items():
        if k in OTHERS:
            out[k] = v
        elif k in PERSON_IDS and isinstance(v, str) and v in ids:
            out[k] = ids[v]
        elif k == "customer" and isinstance(v, dict):
            out[k] = {
                f: ids[x] if isinstance(x, str) and x in ids else None if f in CUSTOMER_DATA else x
                for f, x in v.items()
            }
        elif k in PERSON_DATA:
            out[k] = None
        else:
            out[k] = redact_person(v, ids, hers=True)
    return out


def _names_person(doc: dict[str, Any], ids: Mapping[str, str]) -> bool:
    """``doc`` (an object, and its objects but its lists' and ``OTHERS``) names the person
    in an id field of its own or anywhere in its ``customer`` object."""
    for k, v in doc.items():
        if k in OTHERS:
            continue
        if k in PERSON_IDS and isinstance(v, str) and v in ids:
            return True
        if isinstance(v, dict):
            if k == "customer" and any(isinstance(x, str) and x in ids for x in v.values()):
                return True
            if _names_person(v, ids):
                return True
    return False


def redact(doc: Any, values: Mapping[str, str | None]) -> Any:
    """A JSON document with every string that is a key of ``values`` replaced by its value
    (a pseudonym, or None), at any depth (webhook payloads, fraud evidence, answers)."""
    if isinstance(doc, str):
        return values.get(doc, doc) if doc in values else doc
    if isinstance(doc, list):
        return [redact(v, values) for v in doc]
    if isinstance(doc, dict):
        return {k: redact(v, values) for k, v in doc.items()}
    return doc
