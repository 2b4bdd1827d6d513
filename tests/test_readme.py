"""The documentation as written. The README's tour runs, command by command, against a real
``refstream dev`` started as the README starts it (in a directory of its own, against this
run's servers, a database of its own and this test's key prefix), and every request answers
2xx and moves the demo link's counters; the request examples of docs/http-api.md run after
it. Every relative link in the README, the changelog and docs/ leads to a file, and to a
heading there when it names one."""

from __future__ import annotations

import asyncio
import re
import secrets
import subprocess
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from ingest.contract.settings import Settings
from refstream.services import Services, with_database

from ._procs import REFSTREAM, dev_ports, env_for
from .conftest import drop_database, wait_for
from .test_dev import read_banner, stop_dev

# the same in either pass (the servers are dev's concern, tested in test_dev.py)
pytestmark = pytest.mark.once

ROOT = Path(__file__).resolve().parent.parent
TOUR = "## A five-minute tour"
EXAMPLES = "## Request bodies"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.M | re.S)
_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.M)
_CONSOLE_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[")  # structlog's console renderer


def bash_under(path: Path, heading: str) -> str:
    """The ```bash blocks of the section that ``heading`` opens, joined in order."""
    text = path.read_text()
    start = text.index(f"\n{heading}\n")
    level = heading.split(" ", 1)[0]
    end = re.search(rf"^{level} ", text[start + len(heading) + 2 :], re.M)
    section = text[start : start + len(heading) + 2 + end.start()] if end else text[start:]
    blocks = [body for lang, body in _FENCE.findall(section) if lang == "bash"]
    assert blocks, f"no bash block under {heading!r} in {path.name}"
    return "".join(blocks)


async def test_the_readme_tour_runs_as_written_against_refstream_dev(
    settings: Settings, services: Services, tmp_path: Path
) -> None:
    name = f"refstream_tour_{secrets.token_hex(4)}"
    db = with_database(services.postgres_url, name)
    env = env_for(settings, DATABASE_URL=db, REFSTREAM_LOG_FLUSH_MS="0")
    # refstream not on PATH: the tour's file must say where it is
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if p and p != str(Path(REFSTREAM).parent))
    # curl as typed, told only to fail on an HTTP error (the tour's requests must answer 2xx)
    (tmp_path / "curl").mkdir()
    (tmp_path / "curl" / ".curlrc").write_text("fail-with-body\nshow-error\n")
    env["CURL_HOME"] = str(tmp_path / "curl")
    here = tmp_path / "checkout"  # where ./scripts/dev runs, and the tour's second shell
    here.mkdir()
    errors = tmp_path / "dev.err"
    with open(errors, "wb") as log:
        dev = subprocess.Popen([REFSTREAM, "dev", *dev_ports()], cwd=here, env=env, stdout=subprocess.PIPE, stderr=log)

    async def shell(script: str) -> subprocess.CompletedProcess[bytes]:
        return await asyncio.to_thread(
            subprocess.run,
            ["bash", "-euo", "pipefail", "-x", "-c", script],
            cwd=here,
            env=env,
            capture_output=True,
            timeout=120,
        )

    async def demo() -> dict[str, Any]:
        shown = await shell("source .refstream-dev.env && refstream link show demo --json")
        assert shown.returncode == 0, shown.stderr.decode()[-3000:]
        link: dict[str, Any] = orjson.loads(shown.stdout)
        return link

    try:
        printed = await read_banner(dev, errors)
        # stdout is the banner alone: dev's own log lines are JSON on stderr, as its children's
        assert printed[0].strip() == "" and printed[1].startswith("refstream dev: edge on"), printed[:3]
        tour = bash_under(ROOT / "README.md", TOUR)
        assert tour.startswith("source .refstream-dev.env\n"), tour[:200]
        ran = await shell(tour)
        assert ran.returncode == 0, f"{ran.stderr.decode()[-5000:]}\n== dev:\n{errors.read_text()[-5000:]}"
        assert b"healthy" in ran.stdout  # refstream status, the tour's last command

        async def counted() -> Any:
            link = await demo()
            got = {k: link[k] for k in ("clicks", "bot_clicks", "leads", "conversions")}
            return got if got == {"clicks": 4, "bot_clicks": 0, "leads": 1, "conversions": 2} else False

        await wait_for(counted, timeout=30, what="the tour's events in the demo link's counters")

        async def sold() -> Any:  # the tour's sale, attributed through its lead to the demo link
            conn = await asyncpg.connect(db)
            try:
                return await conn.fetch(
                    "SELECT s.amount, s.currency, s.invoice_id, l.code FROM sales s"
                    " LEFT JOIN links l ON l.id = s.link_id"
                )
            finally:
                await conn.close()

        sales = await wait_for(sold, timeout=30, what="the tour's sale")
        assert [tuple(r) for r in sales] == [(4900, "usd", "in_001", "demo")]

        examples = bash_under(ROOT / "docs" / "http-api.md", EXAMPLES)
        ran = await shell("source .refstream-dev.env\n" + examples)
        assert ran.returncode == 0, f"{ran.stderr.decode()[-5000:]}\n== dev:\n{errors.read_text()[-5000:]}"
        await wait_for(lambda: _more_than(demo, 4), timeout=30, what="the examples' clicks")
    finally:
        await stop_dev(dev)
    try:
        assert dev.returncode == 0, errors.read_text()[-3000:]
        assert not (here / ".refstream-dev.env").exists()  # removed when dev stops
        conn = await asyncpg.connect(db)
        try:
            keys = await conn.fetch("SELECT revoked_at FROM api_keys WHERE name = 'refstream dev tour'")
        finally:
            await conn.close()
        assert len(keys) == 2 and all(k["revoked_at"] is not None for k in keys), keys
        stray = [line for line in errors.read_text().splitlines() if _CONSOLE_LOG.match(line)]
        assert stray == [], stray
    finally:
        await drop_database(services.postgres_url, name)


async def _more_than(demo: Any, clicks: int) -> bool:
    return bool((await demo())["clicks"] > clicks)


# -- links ---------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces as -."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in _HEADING.findall(_FENCE.sub("", path.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(docs: list[Path]) -> list[str]:
    """Each relative link of ``docs`` whose file, or heading, does not exist."""
    broken = []
    for doc in docs:
        text = re.sub(r"`[^`\n]*`", "", _FENCE.sub("", doc.read_text()))
        for target in _LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists():
                broken.append(f"{doc.name}: {target} (no such file)")
            elif anchor and (path.suffix != ".md" or anchor not in anchors(path)):
                broken.append(f"{doc.name}: {target} (no such heading)")
    return broken


def documentation() -> list[Path]:
    docs = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [*docs, *([ROOT / "ARCHITECTURE.md"] if (ROOT / "ARCHITECTURE.md").exists() else [])]


def test_every_relative_link_leads_somewhere() -> None:
    docs = documentation()
    assert len(docs) >= 10 and all(d.exists() for d in docs)
    assert broken_links(docs) == []


def test_a_broken_link_or_anchor_is_found(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text(
        "# Where `it` is: here\n\n## Twice\n\n## Twice\n\n"
        "[fine](b.md) [fine](#where-it-is-here) [fine](#twice-1) [web](https://example.com/x)\n"
        "[gone](c.md) [no heading](b.md#nowhere) [not this one](#where-it-is)\n"
        "```bash\n[ignored](in-a-fence.md)\n```\n"
    )
    (tmp_path / "b.md").write_text("# B\n")
    assert broken_links([tmp_path / "a.md"]) == [
        "a.md: c.md (no such file)",
        "a.md: b.md#nowhere (no such heading)",
        "a.md: #where-it-is (no such heading)",
    ]
