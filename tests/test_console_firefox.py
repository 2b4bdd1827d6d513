"""The console in Firefox (Debian's firefox-esr, headless, driven over WebDriver BiDi by
tests/_bidi.py) with traffic through the edge and a worker running: each page loads its ES
module, asks for a key, then renders its data and its dates, with no script or console
error and no dialog; hostile metadata shows as text and runs nothing."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.manage import admin
from ingest.privacy import erasure as pg_erasure

from ._bidi import BiDi, Event, Tab, firefox
from ._console import CLOSER, HOSTILE, TOKEN, affitor_click, hostile_letter, lead_with_hostile_metadata, running
from ._procs import Procs
from ._world import World
from .conftest import wait_for

FIREFOX = os.environ.get("REFSTREAM_FIREFOX", "/usr/bin/firefox-esr")

if not shutil.which(FIREFOX):
    reason = f"no firefox at {FIREFOX} (scripts/test --system installs Debian's firefox-esr package)"
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"the Firefox test must run in CI: {reason}")
    print(f"\nSKIPPING the console's Firefox tests: {reason}", file=sys.stderr)
    pytest.skip(reason, allow_module_level=True)

CHARTS = ("accepted", "stored", "lag", "pending_age", "live", "spool", "memory", "reachable", "dead")
YEAR = re.compile(r"\b20\d\d\b")  # what a date shows, in any of the viewer's formats
TIME = re.compile(r"\b\d{1,2}[:.]\d\d[:.]\d\d\b")


@pytest.fixture
async def browser() -> AsyncIterator[BiDi]:
    async with firefox(FIREFOX) as bidi:
        await bidi.subscribe("log.entryAdded", "browsingContext.userPromptOpened")
        yield bidi


class Watched:
    """A tab, and its dialogs and its script or console errors as Firefox reports them."""

    def __init__(self, tab: Tab) -> None:
        self.tab = tab
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        tab.bidi.on("log.entryAdded", self._log)
        tab.bidi.on("browsingContext.userPromptOpened", self._prompt)

    def _log(self, entry: Event) -> None:
        if entry["source"].get("context") == self.tab.context and entry["level"] == "error":
            self.errors.append(f"{entry['type']}: {entry['text']}")

    def _prompt(self, prompt: Event) -> None:
        if prompt["context"] == self.tab.context:
            self.dialogs.append(prompt["message"])

    async def until(self, expression: str, what: str, timeout: float = 15) -> Any:
        """``expression``'s value in the page once it is truthy."""
        return await wait_for(lambda: self.tab.evaluate(expression), timeout=timeout, what=what)

    async def text(self, selector: str) -> str:
        return str(await self.tab.call("(s) => document.querySelector(s)?.textContent ?? ''", selector))

    async def texts(self, selector: str) -> list[str]:
        found = await self.tab.call("(s) => [...document.querySelectorAll(s)].map((n) => n.textContent)", selector)
        return [str(t) for t in found]

    def clean(self) -> bool:
        return self.dialogs == [] and self.errors == []


async def open_page(browser: BiDi, base: str, name: str, key: str = TOKEN) -> Watched:
    """The page, with ``key`` entered in its form. Before it, the page has run its module
    (and the modules it imports), asks for a key, and has called nothing that needs one."""
    tab = await browser.tab()
    await tab.set_viewport(1280, 900)
    page = Watched(tab)
    await tab.goto(f"{base}/{name}")
    scripts = await tab.evaluate("[...document.scripts].map((s) => [s.type, s.src])")
    assert scripts == [["module", f"{base}/static/{name}.js"]], scripts
    await page.until("document.getElementById('status').textContent.startsWith('Enter')", f"{name} asking for a key")
    loaded = await tab.evaluate("performance.getEntriesByType('resource').map((e) => e.name)")
    assert f"{base}/static/common.js" in loaded, loaded
    calls = [url.split("/api/")[1] for url in loaded if "/api/" in url]
    assert calls == (["access"] if name != "links" else []), calls
    await tab.call(
        "(key) => { document.getElementById('key').value = key; document.querySelector('#auth button').click(); }",
        key,
    )
    return page


def js(value: str) -> str:
    """``value`` as a JavaScript string literal."""
    return json.dumps(value)


def dated(text: str, *, time: bool = True, year: bool = True) -> bool:
    """Whether ``text`` shows a date as the console writes one (not "-", not Invalid Date)."""
    return "Invalid" not in text and (not year or bool(YEAR.search(text))) and (not time or bool(TIME.search(text)))


async def test_the_watch_sees_script_errors_console_errors_and_dialogs(browser: BiDi, settings: Settings) -> None:
    """What the other tests count on finding nothing: it is found when it happens."""
    async with running(settings) as base:
        page = Watched(await browser.tab())
        await page.tab.goto(f"{base}/tail")
        await page.tab.evaluate("console.error('said'); setTimeout(() => { throw new Error('thrown'); }); alert('hi')")

        async def both() -> bool:
            return len(page.errors) == 2

        await wait_for(both, what="the two errors")
        assert page.errors == ["console: said", "javascript: Error: thrown"]
        assert page.dialogs == ["hi"]
        assert not page.clean()


async def test_hostile_metadata_shows_as_text_and_runs_nothing(
    browser: BiDi, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, world: World, edge: str
) -> None:
    await lead_with_hostile_metadata(edge, world)
    await hostile_letter(redis, keys, world)
    async with running(settings) as base:
        tail = await open_page(browser, base, "tail")
        cells = "[...document.querySelectorAll('#accepted td.payload')].map((c) => c.textContent)"
        shown = await tail.until(f"{cells}.filter((t) => t.includes({js(HOSTILE)})).length", "the hostile lead")
        assert shown >= 1
        assert any(CLOSER in t for t in await tail.texts("#accepted td.payload"))
        # two more polls: nothing fires later either
        first = await tail.text("#status")
        second = await tail.until(
            f"(s => s !== {js(first)} && s)(document.getElementById('status').textContent)", "a poll"
        )
        await tail.until(
            f"![{js(first)}, {js(second)}].includes(document.getElementById('status').textContent)", "a poll"
        )

        dead = await open_page(browser, base, "dead")
        await dead.until("document.querySelector('#letters td.payload')?.textContent.includes('<img')", "the letter")
        assert await dead.text("#letters td.payload") == f"store: {HOSTILE}"
        await dead.tab.evaluate("document.querySelector('#letters button').click()")
        await dead.until(f"document.getElementById('detail-body').textContent.includes({js(CLOSER)})", "its detail")
        assert HOSTILE in await dead.text("#detail-body")

        for page in (tail, dead):
            assert page.clean(), (page.errors, page.dialogs)
            assert await page.tab.evaluate("document.querySelectorAll('img').length") == 0
            assert await page.tab.evaluate("document.scripts.length") == 1


async def test_every_page_renders_its_data_and_dates_with_traffic_flowing(
    browser: BiDi,
    settings: Settings,
    pg: asyncpg.Pool,
    redis: Any,
    keys: Keys,
    world: World,
    edge: str,
    procs: Procs,
    tmp_path: Path,
) -> None:
    worker = procs.start("work")
    await hostile_letter(redis, keys, world)
    async with pg.acquire() as conn:
        read = await admin.create_key(conn, redis, keys, workspace_id=world.workspace_id, scopes=["read"])
    stop = asyncio.Event()
    traffic = asyncio.create_task(_traffic(edge, stop))
    try:
        async with running(settings) as base:
            await _every_page(browser, base, world, read["api_key"], worker, pg, tmp_path)
    finally:
        stop.set()
        await traffic


async def _traffic(edge: str, stop: asyncio.Event) -> None:
    """Clicks through the edge, about ten a second, until ``stop``."""
    while not stop.is_set():
        await affitor_click(edge, "PARTNER123")
        await asyncio.sleep(0.1)


async def _every_page(
    browser: BiDi,
    base: str,
    world: World,
    read_key: str,
    worker: subprocess.Popen[bytes],
    pg: asyncpg.Pool,
    shots: Path,
) -> None:
    """Each page in turn, opened as an operator (links: as a tenant) would."""
    pipeline = await open_page(browser, base, "pipeline")
    for chart in CHARTS:
        points = f"document.querySelectorAll('#chart-{chart} svg circle.point').length"
        await pipeline.until(points, f"the {chart} chart's points", timeout=30)
        assert await pipeline.tab.evaluate(f"document.querySelectorAll('#chart-{chart} svg polyline').length") >= 1
    await pipeline.until(
        "document.querySelector('#chart-live .legend')?.textContent.includes('workers: 1')", "a worker"
    )
    starts = await pipeline.texts("svg text.axis[text-anchor=start]")  # each chart's first time
    assert len(starts) == len(CHARTS) and all(dated(t, year=False) for t in starts), starts
    assert dated(await pipeline.text("#status"))
    await pipeline.tab.screenshot(shots / "pipeline.png")
    assert (shots / "pipeline.png").stat().st_size > 10_000

    tail = await open_page(browser, base, "tail")
    await tail.until("document.querySelector('#accepted tbody tr')?.textContent.includes('PARTNER123')", "a click")
    await tail.until("document.querySelector('#outcomes tbody tr.stored')", "a stored click", timeout=30)
    for table in ("accepted", "outcomes"):
        shown = await tail.texts(f"#{table} tbody tr td:first-child")
        assert shown and all(dated(t) for t in shown), shown

    dead = await open_page(browser, base, "dead")
    await dead.until("document.querySelectorAll('#letters tbody tr').length", "the dead letter")
    assert dated(await dead.text("#letters tbody tr td"))
    reasons = await dead.texts("#reasons li")
    assert len(reasons) == 1 and reasons[0].endswith(": 1"), reasons

    replay = await open_page(browser, base, "replay")
    await replay.until("document.getElementById('status').textContent === ''", "the replay page's first read")
    await replay.tab.evaluate(
        """(() => {
          const d = new Date(Date.now() - 3600e3);
          const local = new Date(d.getTime() - d.getTimezoneOffset() * 60e3).toISOString().slice(0, 19);
          document.querySelector("input[name=since]").value = local;
          document.getElementById("dry").click();
        })()"""
    )
    await replay.until("document.getElementById('outcome').textContent.startsWith('dry run:')", "a dry run", 60)
    assert dated(await replay.text("#progress-text")), await replay.text("#progress-text")
    assert await replay.tab.evaluate("document.querySelectorAll('#counts tbody tr').length") >= 1

    # an erasure with no worker running: a worker's sweep would finish it within seconds
    worker.terminate()
    await asyncio.to_thread(worker.wait, 30)
    erased = await pg_erasure.erase(pg, world.workspace_id, "user_gone", by="test", archive_days=30)
    erasures = await open_page(browser, base, "erasures")
    row = f"[...document.querySelectorAll('#erasures tbody tr')].find((r) => r.textContent.includes('{erased.id}'))"
    await erasures.until(row, "the erasure")
    requested, due = await erasures.tab.evaluate(f"(r => [r.cells[2].textContent, r.cells[4].textContent])({row})")
    assert dated(requested) and dated(due), (requested, due)

    links = await open_page(browser, base, "links", read_key)
    await links.until("document.querySelectorAll('#chart-days svg circle.point').length", "the days' points")
    await links.until("document.querySelectorAll('#days tbody tr').length", "the days' rows")
    assert await links.text("#workspace") == world.workspace_id
    days = await links.texts("#chart-days svg text.axis[text-anchor=start]")
    assert len(days) == 1 and dated(days[0], time=False), days

    for page in (pipeline, tail, dead, replay, erasures, links):
        assert page.clean(), (await page.tab.evaluate("location.pathname"), page.errors, page.dialogs)
