"""The console in a real browser (Debian's chromium, driven by Playwright, headless) with
traffic flowing: hostile metadata shows as text and runs nothing, each chart draws points,
an empty one says "no data yet", a dry run and a replay from the page, and a screenshot of
each page (into ``REFSTREAM_CONSOLE_SCREENSHOTS`` when set: docs/console/ is made so).

Then each point of the console's second pass (issue 65 item 7): an idle rate drawn as 0 and
said so, no traffic told from no data, one window with ticks and units for every chart, a
lag's group and partition named, unknown codes in the tail, Retry once however clicked,
Drop for an undecodable letter, the Replay page's time zone and one vocabulary, a tenant's
navigation, and what a refused visitor reads."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from ingest.contract import wire
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.manage import admin
from ingest.privacy import erasure as pg_erasure
from workers.ops.dead import dropped_key

from ._console import CLOSER, HOSTILE, TOKEN, affitor_click, hostile_letter, lead_with_hostile_metadata, running
from ._procs import Procs
from ._world import BROWSER, World, make_world
from .conftest import wait_for

CHROMIUM = os.environ.get("REFSTREAM_CHROMIUM", "/usr/bin/chromium")

if not shutil.which(CHROMIUM):
    reason = f"no chromium at {CHROMIUM} (scripts/test installs Debian's chromium package)"
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"the browser test must run in CI: {reason}")
    print(f"\nSKIPPING the console's browser tests: {reason}", file=sys.stderr)
    pytest.skip(reason, allow_module_level=True)

from playwright.async_api import (  # noqa: E402
    Browser,
    ConsoleMessage,
    Dialog,
    Error,
    Page,
    Request,
    Route,
    async_playwright,
)

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


async def open_page(browser: Browser, base: str, name: str, key: str = TOKEN, *, zone: str | None = None) -> Watched:
    """The page, with ``key`` typed into its form as an operator would (``zone``: the
    browser's time zone). Before it, the page asks for a key and calls nothing that needs one."""
    page = await browser.new_page(viewport={"width": 1280, "height": 900}, timezone_id=zone)
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
            await pipeline.page.locator("#chart-lag .legend", has_text="group archive · partition 0").wait_for(
                timeout=10_000
            )
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


# -- the console, second pass (issue 65 item 7) ----------------------------------------------

UNITS = {
    "accepted": "events/s",
    "stored": "events/s",
    "lag": "entries",
    "pending_age": "seconds",
    "live": "processes",
    "spool": "events",
    "memory": "bytes",
    "reachable": "1 up, 0 down",
    "dead": "letters",
}
# the last point of a chart's series, and the zero line's height: (last y, zero y)
LAST_POINT = """([chart, series]) => {
  const svg = document.querySelector(`#chart-${chart} svg`);
  const line = svg?.querySelector(`polyline[data-series="${series}"]`);
  if (!line) return null;
  const points = line.getAttribute("points").trim().split(" ");
  const zero = Math.max(...[...svg.querySelectorAll("line.grid")].map((l) => Number(l.getAttribute("y1"))));
  return [Number(points[points.length - 1].split(",")[1]), zero];
}"""


async def _legend(page: Page, chart: str) -> list[str]:
    return [t.strip() for t in await page.locator(f"#chart-{chart} .legend li").all_text_contents()]


async def test_an_idle_rate_is_drawn_as_zeros_and_its_legend_says_the_rate_now(
    browser: Browser, settings: Settings, pg: asyncpg.Pool, redis: Any, world: World, edge: str, drain: Any
) -> None:
    async with running(settings) as base:
        pipeline = await open_page(browser, base, "pipeline")
        await pipeline.page.locator("#chart-dead svg").wait_for(timeout=10_000)
        # a burst of five clicks, stored at once, then nothing
        for _ in range(5):
            await affitor_click(edge, "PARTNER123")
        await drain()
        for chart in ("accepted", "stored"):
            burst = pipeline.page.locator(f"#chart-{chart} .legend li", has_text="affitor:")
            await burst.first.wait_for(timeout=15_000)

            # the samples after the burst: the legend says the rate now (0), the line ends on 0
            async def idle(chart: str = chart) -> bool:
                legend = await _legend(pipeline.page, chart)
                ends = await pipeline.page.evaluate(LAST_POINT, [chart, "affitor"])
                return "affitor: 0/s" in legend and ends is not None and ends[0] == ends[1]

            await wait_for(idle, timeout=15, what=f"{chart}: affitor drawn at 0 once idle, and said so")
        assert pipeline.dialogs == [] and pipeline.errors == []


async def test_no_traffic_reads_otherwise_than_no_data_from_a_console_not_answering(
    browser: Browser, settings: Settings, pg: asyncpg.Pool, redis: Any
) -> None:
    async with running(settings) as base:
        quiet = await open_page(browser, base, "pipeline")
        for chart in ("accepted", "stored"):
            legend = quiet.page.locator(f"#chart-{chart} .legend", has_text="no traffic: 0/s")
            await legend.wait_for(timeout=15_000)
            assert await quiet.page.locator(f"#chart-{chart} svg circle.point").count() >= 1
            assert "no data" not in (await quiet.page.text_content(f"#chart-{chart}") or "")
        # the same page, its samples never answered: no data, and why
        page = await browser.new_page()
        await page.route("**/api/pipeline*", lambda route: route.abort())
        await page.goto(f"{base}/pipeline")
        await page.fill("#key", TOKEN)
        await page.click("#auth button")
        for chart in ("accepted", "stored", "lag"):
            empty = page.locator(f"#chart-{chart} .empty", has_text="no data: the console did not answer")
            await empty.wait_for(timeout=10_000)
        assert "no traffic" not in (await page.text_content("#chart-accepted") or "")


async def test_every_chart_spans_one_window_with_ticks_and_units(
    browser: Browser, settings: Settings, pg: asyncpg.Pool, redis: Any, world: World, edge: str, procs: Procs
) -> None:
    procs.start("work")  # its group: lag and the oldest pending drawn too
    stop = asyncio.Event()
    traffic = asyncio.create_task(_traffic(edge, stop))
    try:
        async with running(settings) as base:
            pipeline = await open_page(browser, base, "pipeline")
            for chart in CHARTS:
                await pipeline.page.locator(f"#chart-{chart} svg").wait_for(timeout=30_000)
            await asyncio.sleep(12)  # a window of 10 s and more: a time tick in it
            # each chart's first time (its x axis' start), read at once
            starts = await pipeline.page.evaluate(
                "[...document.querySelectorAll('.chart-box svg')].map("
                "  (s) => s.querySelector('text.axis[text-anchor=start]').textContent)"
            )
            assert len(starts) == len(CHARTS) and len(set(starts)) == 1, f"the charts start apart: {starts}"
            for chart in CHARTS:
                box = pipeline.page.locator(f"#chart-{chart} svg")
                ys = await box.locator("text.tick-y").all_text_contents()
                if chart == "reachable":
                    assert ys == ["down", "up"], ys
                else:
                    assert len(ys) >= 3 and ys[0] in ("0", "0B"), (chart, ys)
                assert await box.locator("line.tick-x").count() >= 1, chart
                assert await box.locator("text.unit").all_text_contents() == [UNITS[chart]], chart
            windows = await pipeline.page.evaluate(
                "[...document.querySelectorAll('.chart-box svg')].map((s) => s.dataset.t0 + '-' + s.dataset.t1)"
            )
            assert len(windows) == len(CHARTS) and len(set(windows)) == 1, windows
            assert pipeline.dialogs == [] and pipeline.errors == []
    finally:
        stop.set()
        await traffic


async def test_the_lag_legends_name_group_and_partition(
    browser: Browser, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, world: World, edge: str
) -> None:
    await affitor_click(edge, "PARTNER123")
    stream = keys.stream_for("PARTNER123")
    partition = keys.partition_of(stream)
    with contextlib.suppress(Exception):  # BUSYGROUP: the edge made it
        await redis.xgroup_create(stream, "workers", id="0")
    async with running(settings) as base:
        pipeline = await open_page(browser, base, "pipeline")
        for chart in ("lag", "pending_age"):
            named = pipeline.page.locator(
                f"#chart-{chart} .legend li", has_text=f"group workers · partition {partition}:"
            )
            await named.first.wait_for(timeout=15_000)
            assert not [t for t in await _legend(pipeline.page, chart) if re.match(r"\d+ \w+:", t)]
        assert "1 unread" in " ".join(await _legend(pipeline.page, "lag"))


async def test_the_tail_shows_unknown_codes_the_edge_refused_and_the_worker_dropped(
    browser: Browser, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, world: World, edge: str, drain: Any
) -> None:
    # the edge refuses a click on a code no link has: no event, no row
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{edge}/api/v1/track/click",
            json={"affiliate_url": "https://yoursite.com/pricing?aff=NOSUCH7"},
            headers={"User-Agent": BROWSER},
        ) as r,
    ):
        assert r.status >= 400, await r.text()
    # an entry for a code no link has any more (a link deleted after its click was accepted)
    gone = Envelope(
        type=EventType.CLICK,
        dialect=Dialect.BIORE,
        payload={"code": "GONE7"},
        workspace_id=world.workspace_id,
        user_agent=BROWSER,
    )
    await redis.xadd(keys.stream_for("GONE7"), wire.to_entry_dict(gone))
    await drain()
    async with running(settings) as base:
        tail = await open_page(browser, base, "tail")
        refused = tail.page.locator("#outcomes tbody tr", has_text="NOSUCH7")
        await refused.first.wait_for(timeout=10_000)
        assert "unknown_code" in (await refused.first.text_content() or "")
        dropped = tail.page.locator("#outcomes tbody tr", has=tail.page.locator("td", has_text=gone.event_id.hex[:12]))
        await dropped.first.wait_for(timeout=10_000)
        cells = await dropped.first.locator("td").all_text_contents()
        assert "unknown_code" in cells and "GONE7" in cells, cells
        assert tail.dialogs == [] and tail.errors == []


async def _click_letter(redis: Any, keys: Keys, world: World) -> tuple[str, Envelope]:
    """A dead letter of a well-formed click on PARTNER123, as a worker writes one: its id."""
    event = Envelope(
        type=EventType.CLICK,
        dialect=Dialect.BIORE,
        payload={"code": "PARTNER123"},
        workspace_id=world.workspace_id,
        user_agent=BROWSER,
    )
    fields: dict[Any, Any] = {
        **wire.to_entry_dict(event),
        "stream": keys.stream_for("PARTNER123"),
        "id": "1-1",
        "error": "store: x",
        "deliveries": 3,
        "at": int(time.time() * 1000),
    }
    return (await redis.xadd(keys.dead, fields)).decode(), event


async def test_a_double_click_on_retry_queues_its_letter_once_and_the_outcome_names_it(
    browser: Browser, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, world: World
) -> None:
    dead_id, event = await _click_letter(redis, keys, world)
    async with running(settings) as base:
        dead = await open_page(browser, base, "dead")

        async def slow(route: Route) -> None:  # a retry in flight for a second
            await asyncio.sleep(1)
            await route.continue_()

        await dead.page.route("**/api/dead/retry", slow)
        retry = dead.page.locator(f"tr[data-dead-id='{dead_id}'] button.retry, #letters tbody tr button.retry").first
        await retry.wait_for(timeout=10_000)
        await retry.dblclick()
        assert await retry.is_disabled(), "Retry can be clicked again while its request is in flight"
        await dead.page.locator("#outcome", has_text=dead_id).wait_for(timeout=10_000)
        shown = await dead.page.text_content("#outcome") or ""
        assert "requeued" in shown and "requeued 0" not in shown, shown
    assert dead.calls.count("dead/retry") == 1, dead.calls
    entries = await redis.xrange(keys.stream_for("PARTNER123"))
    copies = [f for _, f in entries if wire.from_entry(f).event_id == event.event_id]
    assert len(copies) == 1 and await redis.xlen(keys.dead) == 0


async def test_an_undecodable_letter_offers_drop_with_a_confirm_and_no_retry(
    browser: Browser, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, world: World
) -> None:
    junk = (await redis.xadd(keys.dead, {"id": "1-2", "error": "decode: junk", "e": b"\xff"})).decode()
    async with running(settings) as base:
        dead = await open_page(browser, base, "dead")
        row = dead.page.locator("#letters tbody tr", has_text="decode: junk")
        await row.wait_for(timeout=10_000)
        assert await row.locator("button", has_text="retry").is_disabled()
        await row.locator("button", has_text="drop").click()
        await dead.page.locator("#confirm-text", has_text=junk).wait_for(timeout=5_000)
        await dead.page.click("#confirm-no")  # not yet: nothing dropped
        assert await dead.page.locator("#confirm").is_hidden() and await redis.xlen(keys.dead) == 1
        await row.locator("button", has_text="drop").click()
        await dead.page.click("#confirm-yes")
        await dead.page.locator("#outcome", has_text=f"{junk} (undecodable): dropped").wait_for(timeout=10_000)
        await row.wait_for(state="detached", timeout=10_000)
        assert dead.dialogs == [] and dead.errors == []
    assert await redis.xlen(keys.dead) == 0 and await redis.xlen(dropped_key(keys)) == 1


async def test_the_replay_page_names_its_time_zone_and_says_a_dry_run_and_a_run_alike(
    browser: Browser, settings: Settings, pg: asyncpg.Pool, redis: Any, world: World, edge: str, drain: Any
) -> None:
    for _ in range(3):
        await affitor_click(edge, "PARTNER123")
    await drain()
    await pg.execute("DELETE FROM events WHERE event_id IN (SELECT event_id FROM events LIMIT 1)")
    async with running(settings) as base:
        replay = await open_page(browser, base, "replay", zone="Pacific/Auckland")
        for field in ("since", "until"):
            label = replay.page.locator("label", has=replay.page.locator(f"input[name={field}]"))
            assert "Pacific/Auckland" in (await label.text_content() or ""), field
        await replay.page.evaluate(
            """() => {
              const d = new Date(Date.now() - 3600e3);
              const local = new Date(d.getTime() - d.getTimezoneOffset() * 60e3).toISOString().slice(0, 19);
              document.querySelector("input[name=since]").value = local;
            }"""
        )
        said = {}
        for kind, button in (("dry run", "#dry"), ("replay", "#run")):
            await replay.page.click(button)
            progress = replay.page.locator("#progress-text", has_text=f"{kind} done:")
            await progress.wait_for(timeout=60_000)
            counted = re.match(rf"{kind} done: (\d+) of (\d+) entries", await progress.text_content() or "")
            assert counted and counted[1] == counted[2] == "3", await progress.text_content()
            outcome = await replay.page.text_content("#outcome") or ""
            assert outcome.startswith(f"{kind}: "), outcome
            said[kind] = outcome.removeprefix(f"{kind}: ")
        assert said["dry run"] == said["replay"], said
        assert said["replay"].startswith("3 entries in range, 1 new, 2 stored already"), said
        assert replay.dialogs == [] and replay.errors == []


async def test_a_tenant_sees_no_operator_page_in_the_navigation(
    browser: Browser, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, world: World
) -> None:
    async with pg.acquire() as conn:
        read = await admin.create_key(conn, redis, keys, workspace_id=world.workspace_id, scopes=["read"])
    shown = "[...document.querySelectorAll('nav a')].filter((a) => a.offsetParent !== null).map((a) => a.textContent)"
    async with running(settings) as base:
        tenant = await open_page(browser, base, "links", read["api_key"])
        await tenant.page.locator("#status", has_text="updated").wait_for(timeout=10_000)
        assert await tenant.page.evaluate(shown) == ["Tenant links"]
        operator = await open_page(browser, base, "pipeline")
        every = ["Pipeline", "Live tail", "Dead letters", "Replay", "Erasures", "Tenant links"]
        assert await operator.page.evaluate(shown) == every
        # the operator's tab, on the tenant page: the operator's pages still there
        await operator.page.goto(f"{base}/links")
        await operator.page.locator("#status", has_text="Enter").wait_for(timeout=10_000)
        assert await operator.page.evaluate(shown) == every


async def test_a_refused_visitor_is_told_what_to_do_next(
    browser: Browser, settings: Settings, pg: asyncpg.Pool, redis: Any
) -> None:
    async with running(settings) as base:
        operator = await open_page(browser, base, "dead", "not-the-token")
        refused = operator.page.locator("#refused")
        await refused.wait_for(state="visible", timeout=10_000)
        text = await refused.text_content() or ""
        assert "Refused" in text and "REFSTREAM_CONSOLE_TOKEN" in text and "enter it above" in text, text
        tenant = await open_page(browser, base, "links", "rs_live_not-a-key")
        refused = tenant.page.locator("#refused")
        await refused.wait_for(state="visible", timeout=10_000)
        text = await refused.text_content() or ""
        assert "scope read" in text and "refstream keys create" in text and "Enter it above" in text, text
        for watched in (operator, tenant):
            # the one refusal logged by the browser (a 401): no other error, no dialog
            assert watched.dialogs == [] and all("401" in e for e in watched.errors), watched.errors
