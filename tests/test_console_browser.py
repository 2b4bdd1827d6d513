"""The console in a real browser (Debian's chromium, driven by Playwright, headless) with
traffic flowing: hostile metadata shows as text and runs nothing, each chart draws points,
an empty one says "no data yet", a dry run and a replay from the page, and a screenshot of
each page (into ``REFSTREAM_CONSOLE_SCREENSHOTS`` when set: docs/console/ is made so)."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.manage import admin
from ingest.privacy import erasure as pg_erasure

from ._console import CLOSER, HOSTILE, TOKEN, affitor_click, hostile_letter, lead_with_hostile_metadata, running
from ._procs import Procs
from ._world import World, make_world
from .conftest import wait_for

CHROMIUM = os.environ.get("REFSTREAM_CHROMIUM", "/usr/bin/chromium")

if not shutil.which(CHROMIUM):
    reason = f"no chromium at {CHROMIUM} (scripts/test installs Debian's chromium package)"
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"the browser test must run in CI: {reason}")
    print(f"\nSKIPPING the console's browser tests: {reason}", file=sys.stderr)
    pytest.skip(reason, allow_module_level=True)

from playwright.async_api import Browser, ConsoleMessage, Dialog, Error, Page, Request, async_playwright  # noqa: E402

CHARTS = ("accepted", "stored", "lag", "pending_age", "live", "spool", "memory", "reachable", "dead")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
        )
        try:
            yield b
        finally:
            await b.close()


class Watched:
    """A page's dialogs, script errors, console errors and API calls."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.calls: list[str] = []
        page.on("dialog", self._dialog)
        page.on("pageerror", self._page_error)
        page.on("console", self._console)
        page.on("request", self._request)

    def _request(self, request: Request) -> None:
        if "/api/" in request.url:
            self.calls.append(request.url.split("/api/")[1])

    async def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        await dialog.dismiss()

    def _page_error(self, error: Error) -> None:
        self.errors.append(str(error))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)


async def open_page(browser: Browser, base: str, name: str, key: str = TOKEN) -> Watched:
    """The page, with ``key`` typed into its form as an operator would. Before it, the page
    asks for a key and calls nothing that needs one."""
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    watched = Watched(page)
    await page.goto(f"{base}/{name}")
    await page.locator("#status", has_text="Enter").wait_for()
    assert watched.calls == (["access"] if name != "links" else []), watched.calls
    await page.fill("#key", key)
    await page.click("#auth button")
    return watched


async def test_hostile_metadata_shows_as_text_and_runs_nothing(
    browser: Browser, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, world: World, edge: str
) -> None:
    await lead_with_hostile_metadata(edge, world)
    await hostile_letter(redis, keys, world)
    async with running(settings) as base:
        tail = await open_page(browser, base, "tail")
        cell = tail.page.locator("#accepted td.payload", has_text=HOSTILE)
        await cell.first.wait_for(timeout=10_000)
        assert CLOSER in (await cell.first.text_content() or "")
        for _ in range(2):  # two more polls: nothing fires later either
            before = await tail.page.text_content("#status")
            await tail.page.wait_for_function(
                "before => document.getElementById('status').textContent !== before", arg=before, timeout=10_000
            )

        dead = await open_page(browser, base, "dead")
        await dead.page.locator("#letters td.payload", has_text=HOSTILE).wait_for(timeout=10_000)
        await dead.page.click("#letters button:text('show')")
        await dead.page.locator("#detail-body", has_text=CLOSER).wait_for(timeout=10_000)
        assert HOSTILE in (await dead.page.text_content("#detail-body") or "")

        for watched in (tail, dead):
            assert watched.dialogs == [] and watched.errors == []
            assert await watched.page.evaluate("document.querySelectorAll('img').length") == 0
            scripts = await watched.page.evaluate("[...document.scripts].map(s => s.src)")
            assert len(scripts) == 1 and scripts[0].startswith(base + "/static/")


async def _traffic(edge: str, stop: asyncio.Event) -> None:
    """Clicks through the edge, about ten a second, until ``stop``."""
    while not stop.is_set():
        await affitor_click(edge, "PARTNER123")
        await asyncio.sleep(0.1)


def _shots(tmp_path: Path) -> list[Path]:
    where = [tmp_path]
    if os.environ.get("REFSTREAM_CONSOLE_SCREENSHOTS"):
        where.append(Path(os.environ["REFSTREAM_CONSOLE_SCREENSHOTS"]))
    for d in where:
        d.mkdir(parents=True, exist_ok=True)
    return where


async def _screenshot(page: Page, name: str, where: list[Path], *, full: bool = False) -> None:
    for d in where:
        await page.screenshot(path=str(d / f"{name}.png"), full_page=full)
        assert (d / f"{name}.png").stat().st_size > 10_000


async def test_every_page_works_with_traffic_flowing_each_chart_draws_points(
    browser: Browser,
    settings: Settings,
    pg: asyncpg.Pool,
    redis: Any,
    keys: Keys,
    world: World,
    edge: str,
    procs: Procs,
    tmp_path: Path,
) -> None:
    where = _shots(tmp_path)
    # a worker and an archiver, as refstream dev runs them: their presence, groups and lag
    archive = str(tmp_path / "archive")
    settings = settings.model_copy(update={"archive_url": archive})
    worker = procs.start("work", REFSTREAM_ARCHIVE_URL=archive)
    archiver = procs.start("archive", REFSTREAM_ARCHIVE_URL=archive)
    letter = await hostile_letter(redis, keys, world)
    async with pg.acquire() as conn:
        read = await admin.create_key(conn, redis, keys, workspace_id=world.workspace_id, scopes=["read"])
    empty = await make_world(pg, redis, keys, code="QUIET1", name="Quiet")
    async with pg.acquire() as conn:
        await admin.create_link(
            conn,
            redis,
            keys,
            workspace_id=world.workspace_id,
            code="TAIL2S",
            url="https://yoursite.com/",
            program_id=world.program_id,
            affiliate_id=world.affiliate_id,
        )
    async with pg.acquire() as conn:
        quiet = await admin.create_key(conn, redis, keys, workspace_id=empty.workspace_id, scopes=["read"])
    stop = asyncio.Event()
    traffic = asyncio.create_task(_traffic(edge, stop))
    try:
        async with running(settings) as base:
            pipeline = await open_page(browser, base, "pipeline")
            for chart in CHARTS:
                points = pipeline.page.locator(f"#chart-{chart} svg circle.point")
                await wait_for(points.count, timeout=30, what=f"the {chart} chart's points")
                assert await pipeline.page.locator(f"#chart-{chart} svg polyline").count() >= 1
            live = pipeline.page.locator("#chart-live .legend")
            await live.filter(has_text="workers: 1").filter(has_text="archivers: 1").wait_for(timeout=30_000)
            await pipeline.page.locator("#chart-lag .legend", has_text="0 archive").wait_for(timeout=10_000)
            # a few more samples, so the picture shows lines
            await asyncio.sleep(6)
            await _screenshot(pipeline.page, "pipeline", where, full=True)

            tail = await open_page(browser, base, "tail")
            await tail.page.locator("#outcomes tbody tr.stored").first.wait_for(timeout=10_000)
            await tail.page.locator("#accepted tbody tr").first.wait_for(timeout=10_000)
            await _screenshot(tail.page, "tail", where)
            # filtered by a link no click has reached yet: a click shows within 2 s of its request
            await tail.page.fill("#filter input[name=link]", "TAIL2S")
            await tail.page.click("#filter button")
            # the filtered read shows none (the status said "updated" before it already)
            await tail.page.locator("#accepted tbody tr").first.wait_for(state="detached", timeout=10_000)
            sent = time.monotonic()
            await affitor_click(edge, "TAIL2S")
            await tail.page.locator("#accepted tbody tr", has_text="TAIL2S").wait_for(timeout=2_000)
            assert time.monotonic() - sent < 2

            dead = await open_page(browser, base, "dead")
            await dead.page.locator("#letters tbody tr").first.wait_for(timeout=10_000)
            await dead.page.fill("#filter input[name=code]", "PARTNER123")
            await dead.page.click("#filter button")
            await dead.page.locator("#confirm-text", has_text="Retry 1 dead letter matching").wait_for()
            await _screenshot(dead.page, "dead", where)
            await dead.page.click("#confirm-yes")

            async def stored_once() -> bool:
                return bool(await pg.fetchval("SELECT count(*) FROM events WHERE event_id = $1", letter) == 1)

            await wait_for(stored_once, timeout=30, what="the retried letter's event stored")
            assert await redis.xlen(keys.dead) == 0

            replay = await open_page(browser, base, "replay")
            # a closed range, an hour to ten seconds ago, typed in the viewer's local time: the
            # page's dry run counts what the command line counts over the same instants
            until = int(time.time()) - 10
            since = until - 3600
            await replay.page.evaluate(
                """([since, until]) => {
                  const local = (s) => {
                    const d = new Date(s * 1000);
                    return new Date(d.getTime() - d.getTimezoneOffset() * 60e3).toISOString().slice(0, 19);
                  };
                  document.querySelector("input[name=since]").value = local(since);
                  document.querySelector("input[name=until]").value = local(until);
                }""",
                [since, until],
            )
            await replay.page.click("#dry")
            shown = replay.page.locator("#outcome", has_text="dry run:")
            await shown.wait_for(timeout=60_000)
            cli = await procs.cli(
                "replay",
                "--dry-run",
                "--since",
                datetime.fromtimestamp(since, UTC).isoformat(),
                "--until",
                datetime.fromtimestamp(until, UTC).isoformat(),
            )
            assert f"dry run: {cli['totals']['entries']} entries in range" in (await shown.text_content() or "")
            assert cli["totals"]["entries"] > 0
            await replay.page.click("#run")
            await replay.page.locator("#progress-text", has_text="replay done").wait_for(timeout=60_000)
            await _screenshot(replay.page, "replay", where)

            # an erasure whose archive deadline is now, while no worker runs the sweep that
            # would finish it (a worker's sweep finishes it within seconds): pending, past it
            for p in (worker, archiver):
                p.terminate()
                await asyncio.to_thread(p.wait, 30)
            erased = await pg_erasure.erase(pg, world.workspace_id, "user_gone", by="test", archive_days=0)
            erasures = await open_page(browser, base, "erasures")
            row = erasures.page.locator("#erasures tbody tr", has_text=str(erased.id))
            await row.locator("td.overdue", has_text="OVERDUE").wait_for(timeout=10_000)
            assert "redis" in (await row.text_content() or "")
            await _screenshot(erasures.page, "erasures", where)

            links = await open_page(browser, base, "links", read["api_key"])
            await links.page.locator("#chart-days svg circle.point").first.wait_for(timeout=10_000)
            await links.page.locator("#days tbody tr").first.wait_for(timeout=10_000)
            assert await links.page.text_content("#workspace") == world.workspace_id
            await _screenshot(links.page, "links", where)

            nothing = await open_page(browser, base, "links", quiet["api_key"])
            await nothing.page.locator("#chart-days .empty", has_text="no data yet").wait_for(timeout=10_000)

            refused = await open_page(browser, base, "pipeline", "not-the-token")
            await refused.page.locator("#refused").wait_for(state="visible", timeout=10_000)
            for watched in (pipeline, tail, dead, replay, erasures, links, nothing):
                assert watched.dialogs == [] and watched.errors == [], watched.page.url
    finally:
        stop.set()
        await traffic
