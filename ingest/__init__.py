"""The HTTP edge: validates, authenticates and rate-limits events, appends them to Redis Streams.

Owns the wire contract (``ingest.contract.events``, ``ingest.contract.wire``), the key names
(``ingest.contract.keys``) and the settings.
Never imports ``workers``.
"""
