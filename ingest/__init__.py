"""The HTTP edge: validates, authenticates and rate-limits events, appends them to Redis Streams.

Owns the wire contract (``ingest.events``), the key names (``ingest.keys``) and the settings.
Never imports ``workers``.
"""
