"""The spool: what the edge accepted while Redis could not take it, on local disk (SQLite),
and its drain into the streams."""
