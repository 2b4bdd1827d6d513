"""The ledger room: refunds and their clawbacks, the webhook outbox, and what a webhook's
delivery needs of its target (the sealed signing secret, the public-address check). Below
the edge, the management API and the workers, which all write or read them; it imports
only the contract."""
