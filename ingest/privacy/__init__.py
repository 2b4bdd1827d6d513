"""The erasure room: a person's erasure in Postgres (the ledger, then the rows), an erased
person met again, an affiliate's or participant's erasure, the ledger's copy in Redis, and
whom an erasure names. Below the management API, whose routes start one, and the workers,
whose batches, replays and sweeps keep it; it imports only the contract."""
