"""One run of the bench (``python -m bench``): services, a throwaway database and key
prefix, the selected parts ``runs`` times, medians, and everything stopped and deleted at
the end (Ctrl-C too)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click

from ingest.contract.connections import connect_redis
from ingest.contract.settings import Settings
from refstream import services

from . import report, world
from .archive_parts import part_r
from .bytes_part import part_pgbytes
from .capacity_parts import part_cap
from .console_part import part_con
from .context import Ctx, Options, say
from .durability_part import part_h
from .edge_parts import part_a, part_b
from .idem_parts import part_i
from .import_part import part_imp
from .migrate_part import part_m
from .naive_part import part_c
from .partition_parts import part_p
from .pipeline_parts import part_d, part_e_f
from .procs import Procs
from .shards import part_shards

HUGE_LIMIT = "1000000000"  # per minute: the bench measures the edge, not its rate limits


def machine() -> dict[str, Any]:
    free = subprocess.run(["free", "-g"], capture_output=True, text=True, check=False).stdout
    return {
        "nproc": os.cpu_count(),
        "free_g": free.strip(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


# the settings the bench gives its processes itself: what it measures depends on them
# (``--set`` may not change them: partitions and batch size come from the bench's own
# environment, as its parts size their loads by them)
BENCH_SETS = frozenset(
    {
        "partitions",
        "batch_size",
        "click_rate_limit_per_min",
        "public_rate_limit_per_min",
        "key_rate_limit_per_min",
        "trusted_proxies",
        "spool_dir",
    }
)


def _env(svc: services.Services, opts: Options, spool: str) -> dict[str, str]:
    keep = {"REFSTREAM_LOG_LEVEL", "REFSTREAM_LOG_JSON", "REFSTREAM_CITY_DB"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFSTREAM_") or k in keep}
    # ``--set``: the bench's processes see no other REFSTREAM_ variable of the shell's
    env.update({f"REFSTREAM_{name.upper()}": value for name, value in opts.settings})
    env.update(
        REDIS_URL=svc.redis_url,
        REFSTREAM_PARTITIONS=str(opts.partitions),
        REFSTREAM_BATCH_SIZE=str(opts.batch_size),
        REFSTREAM_CLICK_RATE_LIMIT_PER_MIN=HUGE_LIMIT,
        REFSTREAM_PUBLIC_RATE_LIMIT_PER_MIN=HUGE_LIMIT,
        REFSTREAM_KEY_RATE_LIMIT_PER_MIN=HUGE_LIMIT,
        # wrk sends X-Forwarded-For from 127.0.0.1, as a load balancer would
        REFSTREAM_TRUSTED_PROXIES="127.0.0.1/32",
        REFSTREAM_SPOOL_DIR=spool,
        # one edge process unless a part asks for N (part n): the parts measure one process
        REFSTREAM_PROCESSES="1",
    )
    return env


async def _one_run(ctx: Ctx) -> None:
    steps = [
        ("a", part_a, ctx.wants("a")),
        ("b", part_b, any(ctx.wants(p) for p in ("b000", "b002", "b003", "b004", "b004sale", "batch", "g"))),
        ("c", part_c, ctx.wants("c")),
        ("d", part_d, ctx.wants("d")),
        ("e/f", part_e_f, ctx.wants("e") or ctx.wants("f")),
        ("h", part_h, ctx.wants("h")),
        ("m", part_m, ctx.wants("m")),
        ("r", part_r, ctx.wants("r")),
        ("i", part_i, ctx.wants("i")),
        ("p", part_p, ctx.wants("p")),
        ("cap", part_cap, ctx.wants("cap")),
        ("con", part_con, ctx.wants("con")),
        ("imp", part_imp, ctx.wants("imp")),
        ("pgbytes", part_pgbytes, ctx.wants("pgbytes")),
        ("shards", part_shards, ctx.wants("shards")),
    ]
    for name, fn, wanted in steps:
        if wanted:
            say(f"run {ctx.run + 1}: part {name}")
            await fn(ctx)


def ensure_wrk() -> None:
    """wrk from Debian's packages, installed when missing (as root, where apt-get exists)."""
    if shutil.which("wrk") is not None:
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise click.ClickException("wrk is not installed and cannot be installed here: apt-get install -y wrk")
    say("installing wrk (apt-get install -y wrk)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise click.ClickException(f"{' '.join(cmd)} failed: {done.stderr[-500:]}")


# the parts that never start wrk
NO_WRK = frozenset({"pgbytes", "shards"})


async def bench(opts: Options, stack: ExitStack) -> dict[str, Any]:
    if opts.only - NO_WRK:
        ensure_wrk()
    svc = services.resolve(stack)
    suffix = world.new_suffix()
    database, prefix = f"refstream_bench_{suffix}", f"bench:{suffix}"
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="refstream-bench-")))
    (tmp / "logs").mkdir()
    pg_server = services.with_database(os.environ.get("DATABASE_URL") or svc.postgres_url, "postgres")
    if svc.embedded_postgres:
        pg_server = svc.postgres_url
    env = _env(svc, opts, str(tmp / "spool"))
    procs = Procs(tmp / "logs", env)
    redis = connect_redis(Settings(redis_url=svc.redis_url))
    runs: list[dict[str, float]] = []
    profiles: dict[str, str] = {}
    try:
        say(f"database {database}, key prefix {prefix}, logs in {tmp / 'logs'}")
        w = await world.create(pg_server, database)
        procs.env["DATABASE_URL"] = w.url()
        for run in range(opts.runs):
            ctx = Ctx(opts, procs, w, redis, prefix, run)
            try:
                await _one_run(ctx)
            finally:
                procs.stop_all()
            runs.append(ctx.figures)
            profiles.update(ctx.profiles)
    except RuntimeError as exc:
        raise click.ClickException(f"{exc}\nlogs: {procs.logdir}") from None
    finally:
        procs.stop_all()
        await world.delete_keys(redis, prefix)
        await redis.aclose()
        await world.drop_databases(pg_server, database)
        say("stopped every process, dropped the databases, deleted the keys")
    figures = report.medians(runs)
    report.finish(figures)
    for r in runs:
        report.finish(r)
    return {
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "machine": machine(),
        "options": _opts(opts),
        "runs": len(runs),
        "figures": figures,
        "goals": report.goals(figures),
        "per_run": runs,
        "profiles": {name: report.top_frames(path) for name, path in profiles.items()},
        "notes": NOTES,
    }


def _opts(opts: Options) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in opts.__slots__:
        v = getattr(opts, k)
        out[k] = sorted(v) if isinstance(v, frozenset) else str(v) if isinstance(v, Path) else v
    return out


NOTES = [
    "pgbytes: --pgbytes-clicks seeded clicks (Affitor 60 %, bio.re 25 %, native 15 %; a returning visitor one"
    " click in five, addresses from a million, Googlebot 5 %) with leads on 3 %, conversions on 0.5 % and sales on"
    " 1 % of them, appended to the streams and stored by `refstream work --drain` into a fresh copy of the world's"
    " database, then VACUUM (ANALYZE); pgbytes.per_click.<relation>: the growth of each relation (pg_relation_size"
    " of its main, fsm and vm forks; partitions summed under their parent table or index, TOAST under"
    " <table>_toast) per stored click, the catalogs (pg_*) left out; events_with_indexes: events and its"
    " indexes; total: every relation; pgbytes.click_column.<column>: avg(pg_column_size) of each column of the"
    " stored clicks' rows, (row): pg_column_size of the whole row (its header included)",
    "con: 1 edge, 1 worker and `refstream console` (a token in its environment); (e)'s full load (wrk, seed 000,"
    " the lower of accepted/s and committed/s), then seed 000 open loop at half of it throughout; windows without"
    " consoles (off) and with ten (on: 4 pipeline, 3 tail, 1 dead, 1 erasures, 1 replay, each polling what its page"
    " polls at the page's interval, the token as Bearer) alternate off, on, off, on …; CPU of each process from"
    " /proc/<pid>/stat over each window (children included); con.<k>_added = on cores / off cores - 1 over all"
    " windows, con.pairN.<k>_added per pair (the spread is the machine's noise); accepted_per_s = the generator's"
    " 2xx sent in the window, stored_per_s = rows the window added to events",
    "imp: an edge and --workers workers under --import-live-rate seed 000 clicks/s (open loop); live p99 ="
    " processed_at - received_at of the live rows of each window: before (warm-up + duration), while"
    " `refstream import` runs (its defaults: --share 0.5, --yield-backlog 1000, --yield-lag-ms 20, --nice 10),"
    " after; imp.p99_ratio = during / mean(before, after); then the same file imported again"
    " (imp.second_stored must be 0)",
    "n: hello-world (python -m bench.apps hello --processes N, SO_REUSEPORT) and each (b) route"
    " (refstream serve --processes N) with N = the CPU count, same wrk settings, each N run right after its"
    " one-process run; server_cpu sums the supervisor and its children; on a 2-core machine wrk takes"
    " a share of the same cores, so N / 1 is a floor of what N cores give; <route>.redis_cpu and"
    " <route>_n.redis_cpu: cores Redis used (INFO cpu) over the phase, warm-up included (a Redis shared with"
    " other work counts that too)",
    "closed-loop load: wrk -t1, one server process; p50/p99 from wrk --latency; wrk_cpu = wrk's CPU seconds"
    " (kernel rusage of the child) per wall second; server_cpu likewise from /proc/<pid>/stat",
    "open-loop load (e half load, f): the bench's own asyncio+aiohttp generator, requests started on a 5 ms"
    " schedule whatever the answers; it runs in the bench process, on the same 2 cores",
    "e.sustained_per_s = min(edge accepted/s, rows committed/s) under full wrk load; latency = processed_at -"
    " received_at of the rows received in the measured half-load window (processed_at is the transaction's"
    " now(), i.e. its start: the commit itself is a few ms later)",
    "f: workers stopped (SIGTERM) for --backlog-seconds under the half load, then restarted under the same load;"
    " drain rate = (backlog + ingest during catch-up) / catch-up time, which includes the workers' start-up",
    "r: `work --drain` then `archive --drain` on the same N pre-filled entries (each its own group); events/s"
    " from each one's first read to its exit; then cycles of fill, both drains and a trim under a memory budget"
    " of a third of a cycle: the streams' MEMORY USAGE after each trim",
    "shards: two Postgres servers of the part's own (initdb's settings, fsync and synchronous commit on), A with"
    " the directory, B the shard b; one case with every workspace on A (no shard added), one with them spread"
    " over A and B (`refstream shards add`, `workspace create --shard`), each on fresh databases; --drain-events"
    " mixed events (as (d)) over the 4 workspaces, appended, then one `work --drain`; events_per_s from its first"
    " read until drained; worker_cores, pg_a_cores, pg_b_cores: CPU seconds per wall second over that window"
    " (/proc/<pid>/stat, a server's postmaster with its live backends), worker_us_per_event and pg_us_per_event"
    " (both servers together) the same CPU per event; shards.ratio = two / one within a run",
    "p: two `work --drain` of --drain-events mixed events, into a fresh database and into one whose events table"
    " holds --fill-rows rows over 30 daily partitions (filled once, kept over the runs); p.drop_day_s: DROP of"
    " the oldest filled day's partition",
    "g.redis_bytes_per_event: stream MEMORY USAGE delta / XLEN delta while the workers were stopped (f), else"
    " stream MEMORY USAGE / XLEN after (b)",
    "i: seed 003 (Affixo click, Bearer) without a key, with a fresh Idempotency-Key per request (the atomic"
    " append-or-answer script instead of the XADD), and repeats of 256 keys (answered from their records);"
    " all three format each request in wrk's Lua at send time, so wrk's cost is the same",
    "cap: seed 000 on a Redis of the part's own (redis-server from PATH, no RDB, no AOF; cap.redis_own 0: the"
    " bench's shared Redis, whose CPU then counts other clients too). cap_edge1/2: the edge alone under wrk at"
    " REFSTREAM_PROCESSES 1 and 2, each into its own prefix; cap_w1/2: 1 and 2 `refstream work` alone on those"
    " backlogs, stored (acked) per second from every worker having read every partition until a tenth is left;"
    " cap_idle: 1 edge and 1 worker without load; cap_full (wrk, full load) and cap (open loop at half what"
    " cap_full sustained): windows opened with nothing pending and closed once all is stored; CPU from"
    " /proc/<pid>/stat for the edge and worker (children included), INFO cpu for Redis, /proc/<pid>/stat of the"
    " pg_stat_activity backends of the bench's database for Postgres (pg), its background writer, walwriter and"
    " checkpointer apart (pg_bg: they serve the whole server); per accepted = per 2xx the load generator counted,"
    " per stored = per row the window added to events (under wrk, requests in flight at either end make the two"
    " differ by up to the connections); commits_per_s and stored_per_commit: the bench database's"
    " transactions (pg_stat_database.xact_commit, the meter's own taken off; each end lags by up to a second's"
    " reports, alike under a steady load) and stored events per one; db_bytes_per_stored: the growth of"
    " pg_database_size per stored event,"
    " events_bytes_per_stored that of the events table's partitions (indexes included); bytes_per_stored.<relation>"
    " the growth of each relation that grew (pg_relation_size of its main, fsm and vm forks; partitions summed under"
    " their parent table or index, a TOAST table and its index under <table>_toast), bytes_per_stored.total their"
    " net sum. cap_hello: bench.apps hello under the same wrk, its CPU µs per request from /proc/<pid>/stat over"
    " the measured run (cap_hello.us_per_request); every <kind>_hw_per_<event> is <kind>_us_per_<event> divided"
    " by it: hello-worlds, in which the machine's speed cancels out. With --profile DIR: py-spy on the edge and the"
    " worker, INFO commandstats of the part's own Redis, pg_stat_statements where the server loads it and EXPLAIN"
    " (ANALYZE, BUFFERS) of one worker batch's statements, each tier's top ten in DIR/cap_<tier>_top10.txt",
    "c1ms: Postgres through the bench's own TCP proxy (bench/proxy.py, its own process, 0.5 ms each way"
    " per chunk, in order): the naive app's pool, the edge's and the workers' DATABASE_URL alike; c1ms.rtt_ms is"
    " the SELECT 1 round trip it really gives, proxy_cpu the cores it used (warm-up included); the goals take the"
    " edge against the fastest of the naive variants",
]
