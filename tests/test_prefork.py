"""``refstream serve --processes N``: real supervisor and children on one port. A child
killed is replaced while requests keep being answered; SIGTERM drains a request in flight
and every process exits; SIGHUP replaces every child with no failed request; /metrics sums
every child's figures."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ingest.contract.keys import Keys
from ingest.host.siblings import merge
from refstream.embedded import free_port

from ._procs import Procs
from ._world import BROWSER
from .conftest import wait_for
from .test_metrics import samples

N = 2
CLICK = "/api/v1/referral/click/{code}"
TRACKED = b'{"success":true,"data":{"tracked":true}}'


def children(pid: int) -> set[int]:
    """The supervisor's live children (Linux: /proc/<pid>/task/<pid>/children)."""
    try:
        listed = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return set()
    return {int(c) for c in listed if not _zombie(int(c))}


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return _zombie(pid)


async def start(procs: Procs) -> tuple[str, subprocess.Popen[bytes]]:
    base = await procs.start_edge(REFSTREAM_PROCESSES=str(N), REFSTREAM_CLICK_RATE_LIMIT_PER_MIN="1000000")
    await wait_for(lambda: processes(base, N), what=f"{N} edge processes answering /metrics")
    return base, procs.running[-1]


async def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as http, http.get(f"{base}/metrics") as r:
        assert r.status == 200
        return samples(await r.text())


async def processes(base: str, n: int) -> bool:
    return (await scrape(base)).get(("refstream_edge_processes", ())) == n


async def clicks(base: str, n: int, code: str = "alice") -> list[int | str]:
    """``n`` clicks, each on a new connection (so the kernel spreads them over the
    children); a status, or the error a request failed with."""
    conn = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=conn, headers={"User-Agent": BROWSER}) as http:
        sem = asyncio.Semaphore(8)

        async def one() -> int | str:
            try:
                async with sem, http.post(f"{base}/api/v1/referral/click/{code}") as r:
                    await r.read()
                    return r.status
            except aiohttp.ClientError as exc:
                return repr(exc)

        return list(await asyncio.gather(*(one() for _ in range(n))))


async def exited(proc: subprocess.Popen[bytes], timeout: float = 60) -> int:
    return await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout)


async def test_a_killed_child_is_replaced_and_requests_keep_being_answered(procs: Procs, pg):
    base, sup = await start(procs)
    before = children(sup.pid)
    assert len(before) == N
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    await wait_for(lambda: asyncio.to_thread(gone, victim), what="the killed child to be reaped")
    # while its slot waits for a new child, connections to it queue: answered, not refused
    assert await clicks(base, 40) == [200] * 40
    after = await wait_for(
        lambda: asyncio.to_thread(lambda: len(c := children(sup.pid)) == N and c), what="a replacement child"
    )
    assert victim not in after and len(after & before) == N - 1
    await wait_for(lambda: processes(base, N), what="the replacement answering /metrics")
    assert await clicks(base, 40) == [200] * 40
    assert sup.poll() is None


async def test_sigterm_drains_a_request_in_flight_and_every_process_exits(procs: Procs, pg, redis, keys: Keys):
    ws = await procs.cli("workspace", "create", "Acme")
    await procs.cli("link", "create", "--workspace", ws["workspace_id"], "--code", "alice")
    base, sup = await start(procs)
    kids = children(sup.pid)
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = (
        f"POST /api/v1/referral/click/alice HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {BROWSER}\r\n"
        "Content-Type: application/json\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    )
    writer.write(head.encode())
    await writer.drain()
    # the child answers 100 Continue from inside its request handling: the request is in flight
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100")

    sup.send_signal(signal.SIGTERM)
    log = sorted(procs.logdir.glob("*-serve.log"))[-1]
    await wait_for(
        lambda: asyncio.to_thread(lambda: b"prefork.draining" in log.read_bytes()),
        what="the supervisor to start the drain",
    )
    writer.write(b"{}")
    await writer.drain()
    status_line = await reader.readline()
    assert status_line.startswith(b"HTTP/1.1 200"), status_line
    headers = await reader.readuntil(b"\r\n\r\n")
    length = int(next(h.split(b":")[1] for h in headers.split(b"\r\n") if h.lower().startswith(b"content-length")))
    assert await reader.readexactly(length) == TRACKED
    writer.close()

    assert await exited(sup) == 0
    assert all(gone(pid) for pid in kids)
    stored = sum([await redis.xlen(s) for s in keys.streams])
    assert stored == 1  # the answered event was appended before the child left


async def test_sighup_replaces_every_child_with_no_failed_request(procs: Procs, pg):
    base, sup = await start(procs)
    old = children(sup.pid)
    results: list[int | str] = []
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            results.extend(await clicks(base, 16))

    loader = asyncio.create_task(load())
    await wait_for(lambda: asyncio.sleep(0, len(results) > 0), what="the load to start")
    sup.send_signal(signal.SIGHUP)

    def replaced() -> set[int] | bool:
        now = children(sup.pid)
        return len(now) == N and not (now & old) and all(gone(p) for p in old) and now

    new = await wait_for(lambda: asyncio.to_thread(replaced), timeout=60, what="every child replaced")
    await wait_for(lambda: processes(base, N), what="the new children answering /metrics")
    stop.set()
    await loader
    assert len(new) == N
    assert results and set(results) == {200}, [r for r in results if r != 200][:5]
    assert sup.poll() is None


class KeepAlive:
    """A client holding a pool of keep-alive connections, as a load balancer or a tracker's
    server does, sending without pause; each outcome: a status, or the error it failed with."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.results: list[int | str] = []
        self.stop = asyncio.Event()

    async def run(self, senders: int = 8) -> None:
        conn = aiohttp.TCPConnector(limit=senders)  # keep-alive: connections are reused
        async with aiohttp.ClientSession(connector=conn, headers={"User-Agent": BROWSER}) as http:

            async def sender() -> None:
                while not self.stop.is_set():
                    try:
                        async with http.post(f"{self.base}/api/v1/referral/click/alice") as r:
                            await r.read()
                            self.results.append(r.status)
                    except aiohttp.ClientConnectorError as exc:
                        self.results.append(f"not connected: {exc!r}")  # nothing was sent
                        await asyncio.sleep(0.01)
                    except aiohttp.ClientError as exc:
                        self.results.append(repr(exc))

            await asyncio.gather(*(sender() for _ in range(senders)))

    def unanswered(self) -> list[int | str]:
        """Requests sent and not answered 200 (a connection that was never made sent nothing)."""
        return [r for r in self.results if r != 200 and not str(r).startswith("not connected")]


async def test_sighup_with_keep_alive_clients_answers_every_request(procs: Procs, pg):
    # a reload must not cut a keep-alive connection under a request its client just sent:
    # the draining process answers each connection's next request with Connection: close
    base, sup = await start(procs)
    old = children(sup.pid)
    client = KeepAlive(base)
    loader = asyncio.create_task(client.run())
    await wait_for(lambda: asyncio.sleep(0, len(client.results) > 50), what="the load to start")
    sup.send_signal(signal.SIGHUP)

    def replaced() -> bool:
        now = children(sup.pid)
        return len(now) == N and not (now & old) and all(gone(p) for p in old)

    await wait_for(lambda: asyncio.to_thread(replaced), timeout=60, what="every child replaced")
    seen = len(client.results)
    await wait_for(lambda: asyncio.sleep(0, len(client.results) > seen + 50), what="the new children answering")
    client.stop.set()
    await loader
    assert client.unanswered() == [], client.unanswered()[:5]
    assert [r for r in client.results if r != 200] == []  # the sockets stayed open throughout


async def test_a_drain_answers_every_request_sent_on_a_keep_alive_connection(procs: Procs, pg):
    # one process, drained by SIGTERM under keep-alive load, as an edge behind a balancer
    # (before: requests sent on idle keep-alive connections as the drain began got none)
    base = await procs.start_edge(REFSTREAM_PROCESSES="1", REFSTREAM_CLICK_RATE_LIMIT_PER_MIN="1000000")
    edge = procs.running[-1]
    client = KeepAlive(base)
    loader = asyncio.create_task(client.run())
    await wait_for(lambda: asyncio.sleep(0, len(client.results) > 200), what="the load to start")
    edge.send_signal(signal.SIGTERM)
    assert await exited(edge) == 0
    client.stop.set()
    await loader
    answered = client.results.count(200)
    assert answered > 200 and client.unanswered() == [], client.unanswered()[:5]


async def test_a_new_supervisor_takes_over_the_sockets_with_no_request_unanswered(procs: Procs, pg):
    """``refstream serve --take-over`` beside a running ``serve``: the new supervisor gets the
    listening sockets, serves on them, and the old one drains and exits; a keep-alive client
    and a client opening a connection per request, sending throughout, get every request
    answered 200 (the sockets never close, so nothing queued in them is reset). Then the
    new one can be taken over in turn (it holds the control socket now)."""
    base, old = await start(procs)
    port = base.rsplit(":", 1)[1]
    first = children(old.pid)
    client = KeepAlive(base)
    loader = asyncio.create_task(client.run())
    fresh: list[int | str] = []
    stop = asyncio.Event()

    async def connections() -> None:
        while not stop.is_set():
            fresh.extend(await clicks(base, 16))

    opener = asyncio.create_task(connections())
    await wait_for(lambda: asyncio.sleep(0, len(client.results) > 50 and len(fresh) > 16), what="the load to start")
    new = procs.start(
        "serve", "--port", port, "--take-over", REFSTREAM_PROCESSES=str(N), REFSTREAM_CLICK_RATE_LIMIT_PER_MIN="1000000"
    )
    assert await exited(old) == 0  # drained once the new one served: its children with it
    assert all(gone(p) for p in first)
    seen = len(client.results), len(fresh)
    await wait_for(
        lambda: asyncio.sleep(0, len(client.results) > seen[0] + 50 and len(fresh) > seen[1] + 16),
        what="the new supervisor's children answering",
    )
    stop.set()
    client.stop.set()
    await asyncio.gather(loader, opener)
    assert new.poll() is None and len(children(new.pid)) == N
    assert client.unanswered() == [], client.unanswered()[:5]
    assert fresh and set(fresh) == {200}, [r for r in fresh if r != 200][:5]
    # the control socket is the new one's now: a third takes over from it
    third = procs.start("serve", "--port", port, "--take-over", REFSTREAM_PROCESSES=str(N))
    assert await exited(new) == 0
    await wait_for(lambda: processes(base, N), what="the third supervisor's children answering /metrics")
    assert third.poll() is None


async def test_take_over_with_nothing_to_take_names_what_it_needs(procs: Procs, pg):
    proc = procs.start("serve", "--port", str(free_port()), "--take-over")
    assert await exited(proc) == 1
    assert "--take-over needs a refstream serve of 2 or more processes" in procs.logs()


async def test_sighup_to_a_single_process_edge_is_logged_and_it_goes_on_serving(procs: Procs, pg):
    # no supervisor to reload it: SIGHUP's default would end the process on the spot
    base = await procs.start_edge(REFSTREAM_PROCESSES="1")
    edge = procs.running[-1]
    edge.send_signal(signal.SIGHUP)
    await wait_for(lambda: asyncio.sleep(0, "serve.sighup_ignored" in procs.logs()), what="the SIGHUP's log line")
    assert edge.poll() is None
    async with aiohttp.ClientSession() as http, http.get(f"{base}/healthz") as r:
        assert r.status == 200
    edge.send_signal(signal.SIGTERM)
    assert await exited(edge) == 0


async def test_metrics_sum_every_child(procs: Procs, pg):
    base, _ = await start(procs)
    n = 60
    assert await clicks(base, n, code="nobody") == [200] * n
    key = ("refstream_http_requests_total", (("route", CLICK), ("status", "200")))
    for _ in range(2 * N):  # whichever child a scrape lands on answers for all of them
        figures = await scrape(base)
        assert figures[key] == n
        assert figures[("refstream_http_request_seconds_count", (("route", CLICK),))] == n
        assert figures[("refstream_edge_processes", ())] == N


def _exposition(requests: int, spool_bytes: int) -> str:
    r = CollectorRegistry()
    Counter("refstream_http_requests", "HTTP requests answered", ["route", "status"], registry=r).labels(
        "/x", "200"
    ).inc(requests)
    h = Histogram("refstream_http_request_seconds", "Time", ["route"], buckets=(0.001, 0.01), registry=r)
    h.labels("/x").observe(0.005)
    Gauge("refstream_spool_bytes", "Bytes waiting in the local spool", registry=r).set(spool_bytes)
    Gauge("refstream_other", "A gauge of each process", registry=r).set(1)
    return generate_latest(r).decode()


@pytest.mark.once
def test_merge_sums_counters_keeps_retired_ones_and_takes_the_shared_gauges_once(tmp_path: Path):
    text = merge([_exposition(3, 100), _exposition(4, 100)], retired=[_exposition(5, 999)]).decode()
    got = samples(text)
    assert got[("refstream_http_requests_total", (("route", "/x"), ("status", "200")))] == 12
    assert got[("refstream_http_request_seconds_bucket", (("le", "0.01"), ("route", "/x")))] == 3
    assert got[("refstream_http_request_seconds_count", (("route", "/x"),))] == 3
    assert got[("refstream_spool_bytes", ())] == 100  # one shared spool; a retired process's gauge is gone
    assert got[("refstream_other", ())] == 2
    assert got[("refstream_edge_processes", ())] == 2
    from .test_deploy import _promtool

    try:
        promtool = _promtool()
    except pytest.skip.Exception:
        return  # the parse above is the check where promtool is not installed
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# a child that is ready for its first READY starts and exits at once (status 1) every time
_CRASHING_CHILD = """
import os, sys, time
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
with open(os.environ["STARTS"], "a") as f:
    f.write(f"{time.monotonic()}\\n")
with open(os.environ["STARTS"]) as f:
    n = len(f.read().split())
if n <= int(os.environ["READY"]):
    os.write(int(args["--ready"]), b"1")
sys.exit(1)
"""

_SUPERVISE = """
import sys
from ingest.host.prefork import Supervisor
s = Supervisor("127.0.0.1", 0, 1, print=print, child=[sys.executable, sys.argv[1]])
code = s.run()
print("failed:", s.failed, file=sys.stderr)
sys.exit(code)
"""


def _supervise(tmp_path: Path, ready: int) -> tuple[subprocess.Popen[bytes], Path]:
    child = tmp_path / "child.py"
    child.write_text(_CRASHING_CHILD)
    starts = tmp_path / "starts"
    env = {**os.environ, "STARTS": str(starts), "READY": str(ready)}
    proc = subprocess.Popen([sys.executable, "-c", _SUPERVISE, str(child)], env=env, stderr=subprocess.PIPE)
    return proc, starts


def _starts(path: Path) -> list[float]:
    return [float(t) for t in path.read_text().split()] if path.exists() else []


@pytest.mark.once
async def test_a_child_crashing_at_start_is_restarted_with_a_growing_delay(tmp_path: Path):
    sup, starts = _supervise(tmp_path, ready=1)
    try:
        times = await wait_for(
            lambda: asyncio.to_thread(lambda: len(t := _starts(starts)) >= 4 and t),
            what="four starts of the crashing child",
        )
        gaps = [b - a for a, b in itertools.pairwise(times)][:3]
        # the scheduled backoff is a floor: 0.25 s, then 0.5 s, then 1 s (never a spin)
        assert [g >= d for g, d in zip(gaps, (0.25, 0.5, 1.0), strict=True)] == [True] * 3, gaps
        assert sup.poll() is None
        sup.send_signal(signal.SIGTERM)
        assert await exited(sup) == 0
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()


@pytest.mark.once
async def test_a_child_dying_before_its_first_ready_stops_the_server_with_an_error(tmp_path: Path):
    sup, starts = _supervise(tmp_path, ready=0)
    assert await exited(sup) == 1
    assert sup.stderr is not None
    assert "exited with 1 before it was ready" in sup.stderr.read().decode()
    assert len(_starts(starts)) == 1  # not restarted
