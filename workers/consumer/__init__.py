"""The consumer path: read the streams in the ``workers`` group, store each event once
(enriched, counted, flagged) and announce it; the partitions', retention's and trim's
chores, run by the arq worker."""
