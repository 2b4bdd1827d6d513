"""``refstream``: one command line for the edge, the workers and their operators.

Settings are built once per command, from the environment, and passed down. Commands that
print data print JSON on stdout; diagnostics go to stderr.

Every failure is one line on stderr, ``Error: <what is wrong>; <what to do>``, and a
non-zero exit: a setting under the environment variable that sets it, a Redis or Postgres
under its ``host:port/db`` (never its password), a database that is missing or behind
with the command that fixes it (``ingest.manage.schema_check`` words those). ``--debug`` (or
``REFSTREAM_DEBUG=1``) adds the traceback.

The commands live in ``refstream.commands``, one module per command or family of them;
this module only gathers them into the group the console script runs. How each runs (its
settings, connections and one-line failures) is ``refstream.runner``'s, and how it prints
is ``refstream.output``'s.
"""

from __future__ import annotations

import click

from . import __version__
from .commands import (
    archive,
    commissions,
    console,
    erase,
    feature,
    imports,
    keys,
    links,
    migrate,
    partitions,
    reconcile,
    replay,
    secret_key,
    serve,
    shards,
    status,
    workspace,
)
from .runner import RefstreamGroup


@click.group(cls=RefstreamGroup)
@click.option(
    "--debug", is_flag=True, envvar="REFSTREAM_DEBUG", help="Show the traceback of an error. [env: REFSTREAM_DEBUG]"
)
@click.version_option(__version__, prog_name="refstream")
def main(debug: bool) -> None:
    """refstream: referral and affiliate event ingestion (edge → Redis Streams → workers → Postgres)."""


for command in (
    serve.serve,
    serve.work,
    serve.dev,
    migrate.migrate,
    shards.shards,
    workspace.workspace,
    links.link,
    keys.keys,
    feature.feature,
    secret_key.secret_key,
    replay.replay,
    reconcile.reconcile,
    archive.archive,
    status.status,
    status.dead,
    partitions.partitions,
    commissions.commission,
    commissions.payouts,
    erase.erase,
    imports.import_,
    console.console,
):
    main.add_command(command)


if __name__ == "__main__":
    main(prog_name="refstream")  # dev's children run as `python -m refstream.cli`
