"""Erasure: the ledger of erased people, and what an event of one looks like once scrubbed.

An erasure (``refstream erase``, ``DELETE /v1/customers/{external_id}``) first writes the
ledger: keyed digests (BLAKE2b under a random salt kept in the database) of the
person's external id, visitor ids and click ids, never the values themselves. From its
commit on, every event of the person that reaches a writer is scrubbed before it is
stored or appended: by the workers (``workers.consumer.store``, and so by a replay, which
stores through it), by an edge's spool drain, by an import. Every batch reads the ledger holding an
advisory lock shared until it commits; an erasure, its ledger committed, takes the lock
exclusive once, and so waits out every batch that read the ledger before; only then does
it scrub what is stored.

Scrubbing is the same function everywhere (``scrub``): the visitor's IP and User-Agent go,
so do the payload's contact and browsing fields (``PERSONAL``), and the external and
visitor ids become pseudonyms (``pseudonym``) that are a function of their digest. The
function makes every copy of an event the same scrubbed event, wherever and whenever it
is met: a replayed lead keeps its dedupe key (``lead`` + pseudonym + name), a later sale
of the person attributes to their scrubbed lead, a later click of an erased visitor is not
a new unique visitor. Counters never move for an erasure: it changes who, never how many.

Its pieces, each re-exported here: the identifiers, their digests and pseudonyms, and the
scrub (``ingest.contract.erasure_ids``); a writer's read of the ledger (``Ledger``,
``held``: ``ingest.contract.erasure_read``); what the ledger learns after an erasure
(``held_by_others``, ``learn``: ``ingest.contract.erasure_learn``); and the person taken
out of commands, answers and documents (``scrub_commands``, ``redact_person``:
``ingest.contract.erasure_redact``).
"""

from __future__ import annotations

from ingest.contract.erasure_ids import (
    ENRICHMENT_PERSONAL,
    EVENT,
    EXTERNAL,
    LOCK,
    PERSONAL,
    PREFIX,
    VISITOR,
    digest,
    digests_of,
    forget_salt,
    is_pseudonym,
    known_salt,
    pseudonym,
    pseudonym_of,
    salt,
    scrub,
)
from ingest.contract.erasure_learn import CLICK_BEFORE_MS, first_ms, held_by_others, learn
from ingest.contract.erasure_read import ByPool, Check, Ledger, LedgerUnavailable, Then, held, then_after
from ingest.contract.erasure_redact import (
    CUSTOMER_DATA,
    OTHERS,
    PERSON_DATA,
    PERSON_IDS,
    redact,
    redact_person,
    scrub_answer,
    scrub_commands,
)

__all__ = [
    "CLICK_BEFORE_MS",
    "CUSTOMER_DATA",
    "ENRICHMENT_PERSONAL",
    "EVENT",
    "EXTERNAL",
    "LOCK",
    "OTHERS",
    "PERSONAL",
    "PERSON_DATA",
    "PERSON_IDS",
    "PREFIX",
    "VISITOR",
    "ByPool",
    "Check",
    "Ledger",
    "LedgerUnavailable",
    "Then",
    "digest",
    "digests_of",
    "first_ms",
    "forget_salt",
    "held",
    "held_by_others",
    "is_pseudonym",
    "known_salt",
    "learn",
    "pseudonym",
    "pseudonym_of",
    "redact",
    "redact_person",
    "salt",
    "scrub",
    "scrub_answer",
    "scrub_commands",
    "then_after",
]
