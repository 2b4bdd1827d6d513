"""A Redis primary with one replica and a Sentinel, the edge at ``replicas:1``: the primary
is SIGKILLed under load, Sentinel promotes the replica, the edge (its own link and its spool
drainer) and the workers (their pool and arq's) follow the new primary through Sentinel,
and no event answered 2xx is lost (I1-I3): each was on the replica before its 2xx.

The old primary then comes back empty on its port, and Sentinel makes it a replica of the
new one (as an operator's restart would), so ``replicas:1`` can be met again and keyed
routes, refused while no replica acknowledged, accept again."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from redis.exceptions import RedisError

from ..conftest import wait_for
from ._plan import Plan
from ._sentinel import MASTER, SentinelServer, wait_in_sync
from ._servers import FaultRedis
from ._stage import Stage

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]


async def test_primary_killed_replica_promoted(private_fault_redis, make_stage, plan: Plan):
    primary: FaultRedis = await private_fault_redis()
    replica: FaultRedis = await private_fault_redis("--replicaof", "127.0.0.1", str(primary.port))
    await wait_in_sync(primary, 1)
    sentinel = SentinelServer(primary, primary.port, down_after_ms=1000)
    sentinel.start()
    try:
        await sentinel.wait_master(primary.port)
        await sentinel.wait_replicas(1)
        stage: Stage = make_stage(f"redis+sentinel://127.0.0.1:{sentinel.port}/{MASTER}/0")
        world = await stage.prepare(workers=2, edge_env={"REFSTREAM_ACK_DURABILITY": "replicas:1"})
        async with stage.load(world) as load:
            await asyncio.sleep(plan.warmup_s)
            await stage.storing()
            since = time.monotonic()
            primary.kill()  # SIGKILL: whatever it had not sent the replica is gone
            promoted_in = await sentinel.wait_master(replica.port)
            primary.options = ("--replicaof", "127.0.0.1", str(replica.port))  # back as the new one's replica
            primary.start()
            await primary.ready()
            await wait_in_sync(replica, 1)
            until = time.monotonic()
            # the checks' own client asks the sentinel too, which may still be settling its
            # view (no master named for a moment after the old one came back)
            await wait_for(lambda: _answers(stage), timeout=30, what="the sentinel to name a primary")
            fault_end = await stage.fault_over()
            await asyncio.sleep(plan.tail_s)
        got = Counter(f"{k} {s}" for at, _, k, s in load.record.answers if since <= at < until)
        after = Counter(f"{k} {s}" for at, _, k, s in load.record.answers if at >= until)
        print(
            f"\nSentinel promoted the replica {promoted_in:.1f}s after the kill; answers until a replica was"
            f" back: {dict(got)}; after: {dict(after)}"
        )
        problems = [
            f"{n} public {k.split()[0]} answered {k.split()[1]} during the failover"
            for k, n in got.items()
            if not k.startswith("lead") and not k.endswith(" 200")
        ]
        await stage.finish(
            "redis failover (replicas:1)",
            load.record.accepted,
            fault_end=fault_end,
            refused=load.record.refused(),
            problems=problems,
        )
    finally:
        sentinel.destroy()


async def _answers(stage: Stage) -> bool:
    try:
        await stage.check.redis.ping()
    except (RedisError, OSError):
        return False
    return True
