"""A referrer's domain as Postgres derives it from the row's ``referrer`` (schema 26).

The worker's domain (``workers.consumer.enrich``: the URL's host, lower case, without a
final dot or a leading ``www.``) is what the API shows. Most referrers are plain
``https://host/path`` URLs whose domain this one pattern finds; for those the row keeps no
copy of it, and ``referrer_domain(text)`` in schema.sql reads it back from the referrer.
Where the pattern finds nothing or another domain (upper case, a user, a port out of form,
a space before the scheme), the row keeps the worker's, a null included.
"""

from __future__ import annotations

import functools
import re

# schema.sql's referrer_domain(text) runs this pattern: the two must stay the same text
PATTERN = r"^https?://(?:www\.)?([a-z0-9-]+(?:\.[a-z0-9-]+)*)(?::[0-9]{1,5})?(?:[/?#]|$)"
# Postgres's `$` is the end of the text; Python's also matches before a final newline
_RE = re.compile(PATTERN.removesuffix("$)") + r"\Z)")


@functools.lru_cache(maxsize=10_000)
def derived(referrer: str | None) -> str | None:
    """What ``referrer_domain(referrer)`` gives in Postgres."""
    if referrer is None:
        return None
    m = _RE.match(referrer)
    return m.group(1) if m else None
