"""``refstream secret-key``: a new key for REFSTREAM_SECRET_KEY."""

from __future__ import annotations

import click


@click.command("secret-key")
def secret_key() -> None:
    """Print a new key for REFSTREAM_SECRET_KEY (Fernet), which encrypts webhook signing
    secrets at rest. To rotate: put the new key first, keep the old one after a comma."""
    from ingest.ledger import secretbox

    click.echo(secretbox.generate_key())
