"""The edge's ``ClusterLink`` on a real Redis Cluster (``tests/test_cluster.py``'s three
primaries): a round trip split by hash slot comes back in the caller's order; a trailing
WAIT goes to every primary written and answers the least they confirmed; a slot moved
behind the link's back (MOVED) and a slot in the middle of its move (ASK) are followed,
so the caller gets the value, not the redirection."""

from __future__ import annotations

import secrets
from typing import Any, cast

import pytest
import redis
from redis.crc import key_slot

from ingest.contract.connections import Cluster
from ingest.link.choice import link_for
from ingest.link.cluster import ClusterLink

from .faults._cluster import move_slot, owner
from .test_cluster import cluster as cluster  # the fixture

pytestmark = pytest.mark.once


def _keys_on_each(ports: list[int], prefix: str) -> dict[int, str]:
    """A key served by each primary."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < len(ports):
        key = f"{prefix}:{i}"
        found.setdefault(owner(ports[0], key_slot(key.encode())), key)
        i += 1
    return found


async def test_a_round_trip_split_by_slot_answers_in_order_and_waits_on_every_primary(cluster: list[int]) -> None:
    client = Cluster.from_url(f"redis://127.0.0.1:{cluster[0]}/0")
    link = link_for(client)
    assert isinstance(link.inner, ClusterLink)  # behind the boundary that translates its errors
    prefix = f"rl:{secrets.token_hex(4)}"
    keys = list(_keys_on_each(cluster, prefix).values())
    try:
        sets = [("SET", k, f"v{i}") for i, k in enumerate(keys)]
        gets = [("GET", k) for k in reversed(keys)]
        replies = await link.send([*sets, *gets, ("WAIT", 0, 0)])
        assert replies[: len(keys)] == [b"OK"] * len(keys)
        assert replies[len(keys) : -1] == [f"v{i}".encode() for i in reversed(range(len(keys)))]
        assert replies[-1] == 0  # no replicas: each primary's WAIT 0 answers 0
        stats = {p: cast(dict[str, Any], redis.Redis(port=p).info("commandstats")) for p in cluster}  # sync: a dict
        calls = {p: s.get("cmdstat_wait", {}).get("calls", 0) for p, s in stats.items()}
        assert all(calls.values()), calls  # one WAIT per primary written, none skipped
        # more replicas than any primary has: the least confirmed is short of it
        assert (await link.send([("SET", keys[0], "x"), ("WAIT", 1, 20)]))[-1] == 0
    finally:
        await link.close()
        await client.aclose()


async def test_moved_and_ask_are_followed(cluster: list[int]) -> None:
    client = Cluster.from_url(f"redis://127.0.0.1:{cluster[0]}/0")
    link = link_for(client)
    key = f"rl:{secrets.token_hex(4)}:moved"
    slot = key_slot(key.encode())
    try:
        assert await link.send([("SET", key, "before")]) == [b"OK"]  # the link has its map now
        source = owner(cluster[0], slot)
        target = next(p for p in cluster if p != source)
        move_slot(slot, source, target)
        # its map still says source: MOVED, the map read again, sent where it lives now
        assert await link.send([("GET", key), ("SET", key, "after")]) == [b"before", b"OK"]
        assert redis.Redis(port=target).get(key) == b"after"

        # mid-move: the key is on the importing node already, the slot still the source's
        other = next(p for p in cluster if p != target)
        src, dst = redis.Redis(port=target), redis.Redis(port=other)
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src.execute_command("CLUSTER", "MYID"))
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst.execute_command("CLUSTER", "MYID"))
        src.execute_command("MIGRATE", "127.0.0.1", other, "", 0, 5000, "KEYS", key)
        assert await link.send([("GET", key), ("WAIT", 0, 0)]) == [b"after", 0]  # ASK, ASKING, GET
        for port in cluster:  # finish the move
            redis.Redis(port=port).execute_command(
                "CLUSTER", "SETSLOT", slot, "NODE", dst.execute_command("CLUSTER", "MYID")
            )
        assert await link.send([("GET", key)]) == [b"after"]
    finally:
        await link.close()
        await client.aclose()
