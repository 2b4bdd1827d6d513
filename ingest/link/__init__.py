"""The edge's ways to Redis, below the edge and the spool: the RESP link and the cluster
link, the breaker that refuses at once while Redis is down, the durability wait, and the
once-only append script the edge and the spool's drain both send."""
