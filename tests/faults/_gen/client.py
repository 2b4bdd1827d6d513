"""Clients as real clients behave: each operation is sent to an edge picked at random (a load
balancer that has not noticed a dead edge yet), and a timeout, a cut connection, a 5xx, a
409 or a 429 is retried after a backoff, up to ``ATTEMPTS`` times, with the same bytes: the
same Idempotency-Key when the operation has one, none when it has none. Every attempt is
recorded in the history, answered or not.

Operations are started at their scheduled time whatever the edges do (open loop); a lead
(and a stats read) waits for the operation it names to be done first.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson

from .cases import DNT_AFTER_S, POLL_S
from .history import Attempt, History, Op
from .ops import IMPORT_SOURCE, KEPT_HEADERS, World, classify, make, retryable
from .schedule import OpStep

Command = Callable[..., Awaitable[tuple[int, str, str]]]
ATTEMPTS = 4
DELETE_ATTEMPTS = 12  # a workspace's deletion: retried past the longest fault (10 s)
IMPORT_TIMEOUT_S = 30.0
BACKOFF_S = (0.3, 0.7, 1.5)
TIMEOUT_S = 4.0  # past the edge's own 1 s Redis deadline, a Postgres fallback, a replicas wait
# an answer whose X-Request-ID is not the one its attempt sent: the client library read
# another request's answer off a pooled connection (the edge echoes every request's id), so
# this attempt's own answer is unknown; the connection is closed and the attempt counted so
CROSSED = "CrossedAnswer"


class Clients:
    def __init__(
        self, history: History, world: World, edges: Callable[[], list[tuple[str, str]]], command: Command | None = None
    ) -> None:
        """``edges()``: (name, base URL) of the edges a client may reach now; ``command``:
        ``refstream *args`` as an operator runs it (an import)."""
        self.history = history
        self.world = world
        self.edges = edges
        self.command = command
        self.http: aiohttp.ClientSession | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.done: dict[int, asyncio.Event] = {}
        self.outputs: list[str] = []  # what the commands printed on stderr (the checker reads it for personal data)

    async def run(self, steps: list[OpStep]) -> None:
        """Start every operation at its time; return once all of them are done."""
        self.http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=TIMEOUT_S), connector=aiohttp.TCPConnector(limit=0)
        )
        self.done = {s.n: asyncio.Event() for s in steps}
        try:
            for step in steps:
                delay = step.at - self.history.now()
                if delay > 0:
                    await asyncio.sleep(delay)  # the schedule's pace (open loop), not a synchronisation
                self.tasks.append(asyncio.create_task(self._one(step), name=f"op-{step.n}"))
            await asyncio.gather(*self.tasks)
        finally:
            await self.http.close()

    async def _one(self, step: OpStep) -> None:
        try:
            if step.on is not None:
                await self.done[step.on].wait()
            op = make(step, self.world, self.history)
            self.history.ops[step.n] = op
            if op.skipped is None:
                if op.echo.get("after") is not None:
                    await self._past_refresh(op.echo["after"])
                await self._send(op, random.Random(self.history.seed * 1_000_003 + op.n))
        finally:
            self.done[step.n].set()

    async def _send(self, op: Op, rng: random.Random) -> None:
        if op.kind == "suppress-bulk":
            return await self._bulk(op, rng)
        if op.kind == "poll":
            return await self._poll(op, rng)
        for n in range(op.echo.get("attempts", ATTEMPTS)):
            name, base = rng.choice(self.edges())
            attempt = await self._attempt(op, name, base)
            op.attempts.append(attempt)
            if not retryable(attempt):
                return
            await asyncio.sleep(BACKOFF_S[min(n, len(BACKOFF_S) - 1)] * rng.uniform(0.8, 1.2))  # a client's backoff

    async def _past_refresh(self, listing_n: int) -> None:
        """Until the edges' refresh period has passed since the list (``cases.py``) was last
        written: the documented bound within which every edge honours an entry (its state
        is no one's to read from outside), the pace of a client, not a synchronisation."""
        listing = self.history.op(listing_n)
        ends = [a.at + (a.took or 0.0) for a in listing.attempts] if listing is not None else []
        wait = max(ends, default=0.0) + DNT_AFTER_S - self.history.now()
        if wait > 0:
            await asyncio.sleep(wait)

    async def _bulk(self, op: Op, rng: random.Random) -> None:
        """Each entry of a long do-not-track list by its own POST (``op.body``: the entries),
        a few at once, each retried as a client retries; ``op.echo["by_value"]``: each entry's
        attempts (indexes into ``op.attempts``)."""
        gate = asyncio.Semaphore(op.echo.get("concurrency", 8))
        by_value: dict[int, list[int]] = {}
        op.echo["by_value"] = by_value

        async def one(i: int, entry: dict[str, str]) -> None:
            post = Op(op.n, "suppress", op.token, None, op.method, op.path, op.headers, entry, [])
            async with gate:
                for n in range(ATTEMPTS):
                    name, base = rng.choice(self.edges())
                    attempt = await self._attempt(post, name, base)
                    by_value.setdefault(i, []).append(len(op.attempts))
                    op.attempts.append(attempt)
                    if not retryable(attempt):
                        return
                    await asyncio.sleep(BACKOFF_S[min(n, len(BACKOFF_S) - 1)] * rng.uniform(0.8, 1.2))

        await asyncio.gather(*(one(i, e) for i, e in enumerate(op.body)))

    async def _poll(self, op: Op, rng: random.Random) -> None:
        """A read repeated until it answers 200 (the condition: what it reads is stored) or
        ``POLL_S`` passed; its last answer is its attempt."""
        deadline = time.monotonic() + POLL_S
        looks = 0
        while True:
            name, base = rng.choice(self.edges())
            attempt = await self._attempt(op, name, base)
            looks += 1
            if attempt.status == 200 or time.monotonic() > deadline:
                op.attempts.append(attempt)
                op.echo["looks"] = looks
                return
            await asyncio.sleep(0.2)  # the next look at the condition

    async def _attempt(self, op: Op, name: str, base: str) -> Attempt:
        if op.kind == "import":
            return await self._import(op)
        if op.kind == "t-workspace":
            return await self._workspace(op)
        assert self.http is not None
        attempt = Attempt(edge=name, at=self.history.now())
        started = time.monotonic()
        data = orjson.dumps(op.body) if op.body is not None else None
        rid = f"gen-{op.n}-{len(op.attempts)}-{random.getrandbits(48):012x}"
        headers = {
            **op.headers,
            "X-Request-ID": rid,
            **({"Content-Type": "application/json"} if data is not None else {}),
        }
        try:
            async with self.http.request(
                op.method, base + op.path, data=data, headers=headers, allow_redirects=False
            ) as r:
                if r.headers.get("X-Request-ID", rid) != rid:
                    r.close()  # out of step: never used again
                    attempt.error = CROSSED
                    attempt.took = time.monotonic() - started
                    classify(op, attempt)
                    return attempt
                raw = await r.read()
                attempt.status = r.status
                attempt.headers = {h: r.headers[h] for h in KEPT_HEADERS if h in r.headers}
                if op.kind == "redirect":
                    attempt.body = r.headers.get("Location")
                else:
                    try:
                        attempt.body = orjson.loads(raw) if raw else None
                    except orjson.JSONDecodeError:
                        attempt.body = raw[:200].decode(errors="replace")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            attempt.error = type(exc).__name__
        attempt.took = time.monotonic() - started
        classify(op, attempt)
        return attempt

    async def _import(self, op: Op) -> Attempt:
        """``refstream import`` of the operation's rows: its summary on exit 0 (accepted:
        every row stored once); otherwise it may have stored some of them (unknown), and an
        operator runs it again, whole."""
        assert self.command is not None
        attempt = Attempt(edge="cli", at=self.history.now())
        started = time.monotonic()
        workspace = op.echo.get("workspace", self.world.workspace_id)
        flags = op.echo.get("flags", ("--commissions",))
        with tempfile.NamedTemporaryFile("wb", suffix=".ndjson", prefix=f"import-{op.n}-") as f:
            f.write(op.echo.get("csv") or b"".join(orjson.dumps(r) + b"\n" for r in op.body))
            f.flush()
            try:
                code, out, err = await self.command(
                    "import",
                    f.name,
                    "--workspace",
                    workspace,
                    "--source",
                    IMPORT_SOURCE,
                    *flags,
                    "--yield-backlog",
                    "5000",
                    "--yield-lag-ms",
                    "0",
                    "--json",
                    within_s=IMPORT_TIMEOUT_S,
                )
            except TimeoutError:
                code, out, err = -1, "", "timed out"
        self.outputs.append(err)
        attempt.took = time.monotonic() - started
        if code == 0 or (code == 3 and op.echo.get("refused_rows")):  # 3: it refused rows, and stored the rest
            attempt.status, attempt.outcome, attempt.body = 200, "ok", orjson.loads(out)
        else:
            attempt.error = f"exit {code}: {(err.strip().splitlines() or [''])[-1][:200]}"
        return attempt

    async def _workspace(self, op: Op) -> Attempt:
        """An operator's afternoon with a third workspace: made, a link, the pair's rows
        imported, the customer erased there (``refstream erase``), the workspace deleted.
        A step that fails under a fault ends the afternoon early, but the workspace made is
        deleted all the same (retried, as an operator would: a second delete of a deleted
        workspace says "not found"). ``op.echo["deleted"]``: the workspaces whose deletion
        was answered; the checker holds only those to leaving no row (``walls.py``)."""
        assert self.command is not None
        attempt = Attempt(edge="cli", at=self.history.now())
        started = time.monotonic()
        made = None
        try:
            ws = await self._cli("workspace", "create", "gen-c")
            made = ws["workspace_id"]
            self.world.gone[made] = "c"
            await self._cli(
                "link",
                "create",
                "--workspace",
                made,
                "--code",
                op.echo["code"],
                "--url",
                f"https://shop.test/{op.echo['code']}",
            )
            with tempfile.NamedTemporaryFile("wb", suffix=".ndjson", prefix=f"import-{op.n}-") as f:
                f.write(b"".join(orjson.dumps(r) + b"\n" for r in op.body))
                f.flush()
                await self._cli("import", f.name, "--workspace", made, "--source", IMPORT_SOURCE, "--yield-lag-ms", "0")
            await self._cli("erase", "--customer", op.echo["customer"], "--workspace", made)
            attempt.status, attempt.outcome = 200, "ok"
        except (AssertionError, TimeoutError, orjson.JSONDecodeError) as exc:
            attempt.error = str(exc)[:300]
        finally:
            if made is not None and await self._delete(made):
                op.echo.setdefault("deleted", []).append(made)
            elif made is not None:
                attempt.status, attempt.outcome = None, "unknown"
        attempt.took = time.monotonic() - started
        return attempt

    async def _delete(self, workspace: str) -> bool:
        """Until it is answered, for as long as a fault may last (an operator's persistence)."""
        assert self.command is not None
        for n in range(DELETE_ATTEMPTS):
            code, _, err = await self.command(
                "workspace", "delete", workspace, "--yes", "--json", within_s=IMPORT_TIMEOUT_S
            )
            self.outputs.append(err)
            if code == 0 or (n and "not found" in err):
                return True
            await asyncio.sleep(BACKOFF_S[-1])  # an operator's pause before trying again
        return False

    async def _cli(self, *args: str) -> dict[str, Any]:
        assert self.command is not None
        code, out, err = await self.command(*args, "--json", within_s=IMPORT_TIMEOUT_S)
        self.outputs.append(err)
        if code != 0:
            raise AssertionError(f"refstream {args[0]} {args[1] if len(args) > 1 else ''}: exit {code}: {err[-200:]}")
        parsed: dict[str, Any] = orjson.loads(out)
        return parsed
