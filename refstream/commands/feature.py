"""``refstream feature``: the kill switches, read by every edge."""

from __future__ import annotations

from typing import Any

import click

from ingest.contract.connections import connect_redis
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.edge import flags
from refstream import output as out
from refstream.runner import print_data, run_command


@click.group()
def feature() -> None:
    """Kill switches."""


def _feature(name: str, enabled: bool) -> None:
    async def go(settings: Settings) -> dict[str, Any]:
        redis = connect_redis(settings)
        try:
            keys = Keys(settings.stream_prefix, settings.partitions)
            await flags.set_enabled(
                redis, keys, name, enabled, replicas=settings.ack_replicas, wait_ms=settings.ack_wait_ms
            )
        finally:
            await redis.aclose()
        return {"feature": name, "enabled": enabled}

    try:
        print_data(run_command(go))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


@feature.command("disable")
@out.json_option
@click.argument("name", type=click.Choice(flags.FEATURES))
def feature_disable(name: str) -> None:
    """Turn a feature off (its routes answer 503)."""
    _feature(name, False)


@feature.command("enable")
@out.json_option
@click.argument("name", type=click.Choice(flags.FEATURES))
def feature_enable(name: str) -> None:
    """Turn a feature back on."""
    _feature(name, True)
