"""A ``redis+sentinel://`` URL read into the Sentinel deployment it names: a leaf module,
so that the settings (which check such URLs) and the connections (which open them) both
use it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

__all__ = ["SENTINEL_SCHEME", "SentinelTarget", "sentinel_target"]

SENTINEL_SCHEME = "redis+sentinel"


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """``redis+sentinel://[user:password@]host:port[,host:port...]/master[/db]``: the
    sentinels to ask, the name of the monitored master, and what to send the data servers
    (the credentials go to the primary and replicas; the sentinels are asked without)."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None

    @property
    def where(self) -> str:
        hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
        return f"sentinel {hosts} master {self.master}/{self.db}"


def sentinel_target(url: str) -> SentinelTarget | None:
    """The Sentinel deployment a ``redis+sentinel://`` URL names; None for any other URL.
    Raises ValueError for a sentinel URL that lacks hosts or the master's name."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != SENTINEL_SCHEME:
        return None
    netloc, _, path = rest.partition("/")
    path = path.partition("?")[0]
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username, password = (unquote(user) or None), (unquote(secret) if colon else None)
    sentinels = []
    for hostport in filter(None, hosts.split(",")):
        if hostport.startswith("["):  # [::1]:26379
            host, _, port = hostport[1:].partition("]")
            port = port.removeprefix(":")
        else:
            host, _, port = hostport.partition(":")
        port = port or "26379"
        if not port.isdigit():
            raise ValueError(f"a sentinel URL's port must be a number, not {port!r}")
        sentinels.append((host, int(port)))
    master, _, db = path.partition("/")
    if not sentinels or not master:
        raise ValueError("a sentinel URL reads redis+sentinel://host:26379[,host:26379...]/<master name>[/<db>]")
    if db and not db.strip("/").isdigit():
        raise ValueError(f"a sentinel URL's database must be a number, not {db!r}")
    return SentinelTarget(tuple(sentinels), unquote(master), int(db.strip("/") or 0), username, password)
