"""``refstream partitions``: the stream partition count, shown and changed live
(``ingest.contract.layout``; the procedure is in docs/operations.md)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import click

from ingest.contract import layout
from ingest.contract.connections import Redis, connect_redis
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from refstream import output as out
from refstream.runner import print_data, run_command

WAIT_EVERY_S = 1.0


async def _state(redis: Redis, keys: Keys, settings: Settings) -> dict[str, Any]:
    """The layout, with each partition's length (a retiring one is retired when empty)."""
    lay = await layout.load(redis, keys, settings.partitions)
    lengths = {p: int(await redis.xlen(keys.stream(p))) for p in range(lay.span)}
    state = lay.describe()
    state["lengths"] = {str(p): n for p, n in lengths.items()}
    state["env"] = settings.partitions
    return state


@click.group(invoke_without_command=True)
@out.json_option
@click.pass_context
def partitions(ctx: click.Context) -> None:
    """The number of stream partitions: the edges write `count`, the workers read `span`
    (the partitions past `count` retire once empty). Without a subcommand, show them."""
    if ctx.invoked_subcommand is not None:
        return

    async def go(settings: Settings) -> dict[str, Any]:
        redis = connect_redis(settings)
        try:
            return await _state(redis, Keys(settings.stream_prefix, settings.partitions), settings)
        finally:
            await redis.aclose()

    print_data(run_command(go))


@partitions.command("set")
@out.json_option
@click.argument("count", type=click.IntRange(1, 1024))
@click.option("--wait", is_flag=True, help="After a shrink, wait until every retiring partition is retired.")
@click.option("--timeout", default=600.0, show_default=True, type=click.FloatRange(min=0), help="Seconds, with --wait.")
def set_count(count: int, wait: bool, timeout: float) -> None:
    """Make the edges write COUNT partitions, live; edges and workers follow within a second,
    in any order. A grow makes the new partitions' streams and groups first. After a shrink
    the workers read the partitions past COUNT until each is empty (trimmed once every
    group acked it), then it is retired. Set REFSTREAM_PARTITIONS to COUNT as well: it is
    what a Redis that lost its data starts from."""

    async def go(settings: Settings) -> dict[str, Any]:
        redis = connect_redis(settings)
        keys = Keys(settings.stream_prefix, settings.partitions)
        try:
            before, _ = await layout.set_count(
                redis,
                keys,
                settings.partitions,
                count,
                window_ms=settings.idempotency_window_s * 1000,
                replicas=settings.ack_replicas,
                wait_ms=settings.ack_wait_ms,
            )
            deadline = time.monotonic() + timeout
            while wait and (await layout.load(redis, keys, settings.partitions)).retiring:
                if time.monotonic() > deadline:
                    raise click.ClickException(
                        f"partitions still retiring after {timeout:.0f} s: are workers running? "
                        "(refstream partitions shows each one's length)"
                    )
                await asyncio.sleep(WAIT_EVERY_S)
            return {"before": before.count, **await _state(redis, keys, settings)}
        finally:
            await redis.aclose()

    print_data(run_command(go))
