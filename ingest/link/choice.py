"""Which link a Redis client gets: the edge's own RESP link to a single Redis or Sentinel's
primary, one per primary of a Redis Cluster, else redis-py's pipeline (TLS, a credential
provider)."""

from __future__ import annotations

from ingest.contract.connections import Redis
from ingest.link.cluster import ClusterLink
from ingest.link.resp import DirectLink, Link, PipelineLink


def link_for(redis: Redis) -> Link:
    return DirectLink.for_client(redis) or ClusterLink.for_client(redis) or PipelineLink(redis)
