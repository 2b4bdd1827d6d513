"""The operators' tools: replay, dead letters, status and reconcile."""
