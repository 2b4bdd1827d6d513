"""A Redis Cluster (three primaries, each with a replica) resharded under load: every stream
partition's slot is moved to another primary by hand (``CLUSTER SETSLOT`` and ``MIGRATE``,
what ``redis-cli --cluster reshard`` does for each slot), then a fourth primary joins and
``redis-cli --cluster rebalance --cluster-use-empty-masters`` gives it a share of every
other primary's slots, the partitions' among them if they fall there.

While a slot moves its keys answer MOVED or ASK, a worker's blocked XREADGROUP ends with
"UNBLOCKED the stream key no longer exists", and the whole stream key is blocked on both
nodes for the one MIGRATE that carries it. What must hold (I1-I3 by the stage's checker):
nothing lost, nothing doubled, nothing left pending; no worker exits or stops for good; no
answer but 200 and the documented 503 (nothing is lost here: no node dies, so no event
answered 2xx may be missing). The figure line and the printout give the longest MIGRATE:
the pause one partition's size costs.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
import redis

from ..conftest import wait_for
from ._cluster import agreed, cli, form, move_slot, new_node, owner, primaries, slot_of, synced
from ._plan import Plan
from ._servers import FaultRedis
from ._stage import Stage

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]


@pytest.mark.parametrize("durability", ["primary", "replicas:1"])
async def test_partitions_moved_and_a_primary_added_under_load(
    nodes: list[FaultRedis], make_stage, plan: Plan, durability: str
):
    await form(nodes)
    stage: Stage = make_stage(f"redis://127.0.0.1:{nodes[0].port}/0", cluster=True)
    # at replicas:1 the edges' appends and the workers' reads follow a moving slot with their
    # WAIT on the primary that serves it (MOVED, ASK: ``ClusterLink``, ``workers.group.reads.Reads._read_waited``)
    level = {"REFSTREAM_ACK_DURABILITY": durability}
    world = await stage.prepare(workers=2, edge_env=level, REFSTREAM_ACK_DURABILITY=durability)
    async with stage.load(world) as load:
        await asyncio.sleep(plan.warmup_s)
        await stage.storing()
        started = time.monotonic()
        # 1. each partition's slot to the next primary, by hand, round after round
        ports = [n.port for n in nodes]
        moves = []
        for _ in range(2 if plan.mode == "short" else 8):
            for p in range(stage.keys.partitions):
                slot = slot_of(stage.keys.stream(p))
                source = owner(nodes[0].port, slot)
                holders = sorted(primaries(nodes[0].port))
                target = holders[(holders.index(source) + 1) % len(holders)]
                keys, longest = move_slot(slot, source, target)
                moves.append((p, keys, round(longest * 1000, 1)))
                await wait_for(lambda: agreed(ports), timeout=30, what=f"every node to agree on slot {slot}'s move")
        # 2. a fourth primary joins; rebalance gives it about a quarter of the slots
        joined = new_node()
        nodes.append(joined)  # the fixture stops it with the others
        await joined.ready()
        cli("--cluster", "add-node", f"127.0.0.1:{joined.port}", f"127.0.0.1:{nodes[0].port}")
        ports.append(joined.port)
        await wait_for(lambda: agreed(ports), timeout=30, what="the new node to join")
        if durability != "primary":  # a primary joins with its replica, or WAIT 1 is never met there
            replica = new_node()
            nodes.append(replica)
            await replica.ready()
            joined_id = redis.Redis(port=joined.port).execute_command("CLUSTER", "MYID").decode()
            cli(
                "--cluster",
                "add-node",
                f"127.0.0.1:{replica.port}",
                f"127.0.0.1:{joined.port}",
                "--cluster-slave",
                "--cluster-master-id",
                joined_id,
            )
            ports.append(replica.port)
            await wait_for(lambda: agreed(ports), timeout=30, what="the new replica to join")
            await wait_for(lambda: synced(nodes), timeout=60, what="the new replica in sync")
        cli("--cluster", "rebalance", f"127.0.0.1:{nodes[0].port}", "--cluster-use-empty-masters")
        await wait_for(lambda: agreed(ports), timeout=60, what="every node to agree after the rebalance")
        done = time.monotonic()
        fault_end = await stage.fault_over()
        await asyncio.sleep(plan.tail_s)

    shares = primaries(nodes[0].port)
    assert shares.get(joined.port, 0) > 16384 // 8, f"the rebalance gave the new primary {shares}"
    answers = Counter(f"{k} {s}" for at, _, k, s in load.record.answers if at >= started)
    longest = max(m[2] for m in moves)
    print(
        f"\nreshard: {done - started:.1f}s; partitions moved (partition, keys, longest MIGRATE ms): {moves};"
        f" slots now {shares}; answers meanwhile: {dict(answers)}"
    )
    problems = [
        f"{n} {k.split()[0]} answered {k.split()[1]}" for k, n in answers.items() if k.split()[1] not in ("200", "503")
    ]
    await stage.finish(
        f"redis cluster reshard ({durability}, longest MIGRATE {longest:.0f} ms)",
        load.record.accepted,
        fault_end=fault_end,
        refused=load.record.refused(),
        problems=problems,
    )
