"""A full disk under the edge's spool during a Redis outage, under load: the spool lives on
a small tmpfs the test mounts (or, where mounting is refused, the edge runs under an
RLIMIT_FSIZE, lifted when the fault ends). Requests the spool could not keep answer 503;
every one answered 2xx is stored exactly once; nothing refused is ever stored."""

from __future__ import annotations

import asyncio
import resource
import subprocess
from pathlib import Path

import pytest

from ._plan import Plan
from ._spool import durable_redis, edges, redis_down, redis_up, spooled
from ._stage import Stage

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]

# the spool keeps a 1 MiB reserve (for its deletes on a full disk): half a MiB is left to fill
DISK = "1536k"
LIMIT = 1 << 20  # RLIMIT_FSIZE where no tmpfs can be mounted


def mount_small(path: Path) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(path)], capture_output=True, check=False
    )
    return done.returncode == 0


async def test_spool_disk_full(private_fault_redis, make_stage, plan: Plan):
    server = await durable_redis(private_fault_redis)
    stage: Stage = make_stage(server.url)
    disk = Path(stage.settings.spool_dir)
    mounted = mount_small(disk)
    try:
        world = await stage.prepare(workers=2)
        (edge,) = edges(stage)
        if not mounted:
            resource.prlimit(edge.pid, resource.RLIMIT_FSIZE, (LIMIT, resource.RLIM_INFINITY))  # soft: liftable
        async with stage.load(world) as load:
            await asyncio.sleep(plan.warmup_s)
            await stage.storing()
            redis_down(server)
            before = load.record.statuses.copy()
            # the outage lasts until the disk refused requests for a while (or the bound)
            deadline = asyncio.get_running_loop().time() + 6 * plan.redis_full_s
            while asyncio.get_running_loop().time() < deadline:
                refused = sum(
                    n
                    for k, n in (load.record.statuses - before).items()
                    if k.endswith(" 503") and not k.startswith("lead")
                )
                if refused >= 20:
                    break
                await asyncio.sleep(0.2)
            during = load.record.statuses - before
            held = spooled(stage)
            if not mounted:
                resource.prlimit(edge.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
            await redis_up(server)
            fault_end = await stage.fault_over()
            await asyncio.sleep(plan.tail_s)
        print(
            f"\n{'tmpfs ' + DISK if mounted else f'RLIMIT_FSIZE {LIMIT}'}: answers while full: {dict(during)};"
            f" spooled {held}"
        )
        public_503 = sum(n for k, n in during.items() if k.endswith(" 503") and not k.startswith("lead"))
        assert public_503 >= 20, f"the disk never refused: {dict(during)}"
        figures = await stage.finish(
            f"spool: disk full ({'tmpfs' if mounted else 'RLIMIT_FSIZE'}), {public_503} refused by it",
            load.record.accepted,
            fault_end=fault_end,
            refused=load.record.refused(),
        )
        assert figures.extras == 0, f"{figures.extras} events stored that were refused"
    finally:
        if mounted:
            await asyncio.to_thread(stage.procs.stop_all)  # the mount must be free to go
            subprocess.run(["umount", str(disk)], check=False)
