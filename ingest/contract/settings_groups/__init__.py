"""The settings' groups, one class each (``ingest.contract.settings.Settings`` is all of
them together): the connections and the streams, the edge, the worker, the clock, the
archive and erasure, the logs. Each group holds its fields and the validators of its own
fields; the rules across groups are ``Settings``'."""
