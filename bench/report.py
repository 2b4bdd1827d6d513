"""Medians over runs, the issue's goals next to the figures, and the rich table."""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


@dataclass(frozen=True, slots=True)
class Goal:
    label: str
    figure: str
    op: str  # ">=" or "<="
    target: float

    def met(self, value: float) -> bool:
        return value >= self.target if self.op == ">=" else value <= self.target


# issue 17's goals (round two); (b)/(a) at 1 process, the project's aim beyond it 0.75.
# The naive comparison is the one users face: Postgres through the bench's 1 ms latency
# proxy, against the fastest naive variant (naive_part.py); the local ratios
# (c.tput_ratio, c.p99_ratio) stay in the table as figures beside it
GOALS = (
    *(Goal(f"(b)/(a) seed {s} req/s, 1 process", f"b{s}.ratio_a", ">=", 0.5) for s in ("000", "002", "003", "004")),
    Goal("(c 1 ms) edge / naive throughput", "c1ms_edge.tput_ratio", ">=", 8.0),
    Goal("(c 1 ms) edge / naive p99 (≤ 1/10)", "c1ms_edge.p99_ratio", "<=", 0.1),
    Goal("batch / single-event events/s per edge core", "batch.ratio_single", ">=", 4.0),
    Goal("(d) worker / Postgres ceiling", "d.ratio", ">=", 0.85),
    Goal("(e) sustained / edge-only (b 000)", "e.ratio_edge", ">=", 0.7),
    Goal("(e) p99 accept→commit at half load, ms", "e.p99_ms", "<=", 50.0),
    Goal("(f) backlog drain / ingest rate", "f.multiple", ">=", 3.0),
    Goal("(p) worker into a full events table / into an empty one", "p.ratio", ">=", 0.9),
    Goal("(p) drop one day's partition, s", "p.drop_day_s", "<=", 1.0),
    Goal("(g) edge peak RSS per process, MB", "g.edge_rss_mb", "<=", 150.0),
    Goal("(g) worker peak RSS, MB", "g.worker_rss_mb", "<=", 300.0),
    Goal("(g) Redis bytes per pending event", "g.redis_bytes_per_event", "<=", 300.0),
    Goal("(con) edge CPU added by ten open consoles at (e)'s half load", "con.edge_added", "<=", 0.02),
    Goal("(con) worker CPU added by ten open consoles at (e)'s half load", "con.worker_added", "<=", 0.02),
    # without it the two above compare different loads (fewer clicks, less CPU: "met" for nothing)
    Goal("(con) the load held with ten consoles open: accepted/s on / off", "con.load_held", ">=", 0.98),
    Goal("(imp) live p99 accept→commit while importing / without", "imp.p99_ratio", "<=", 1.5),
    Goal("(pgbytes) Postgres bytes per stored click", "pgbytes.per_click.total", "<=", 600.0),
    Goal("(imp) rows a second import of the same file stores", "imp.second_stored", "<=", 0.0),
    # the cost goals, in hello-worlds (µs ÷ bare aiohttp's µs a request in the same run)
    Goal("(cap) CPU a stored click at full load, all in, hello-worlds", "cap_full.total_hw_per_stored", "<=", 4.0),
    Goal("(cap) the edge's CPU a stored click at full load, hello-worlds", "cap_full.edge_hw_per_stored", "<=", 2.0),
    Goal("(cap) Postgres's CPU a stored click at full load, hello-worlds", "cap_full.pg_hw_per_stored", "<=", 0.6),
    Goal("(cap) Postgres bytes a stored click at full load", "cap_full.bytes_per_stored.total", "<=", 400.0),
)

SECTIONS = {
    "a": "(a) bare aiohttp hello-world POST, 1 process, uvloop",
    "b000": "(b) edge, seed 000 POST /api/v1/referral/click/{code}",
    "b002": "(b) edge, seed 002 POST /api/v1/track/click",
    "b003": "(b) edge, seed 003 POST /v1/track/click (Bearer)",
    "b004": "(b) edge, seed 004 POST /api/track/lead (Bearer, clickId)",
    "b004sale": "(b) edge, Refport POST /api/track/sale (Bearer, no invoice)",
    "a_n": "(n) bare aiohttp hello-world POST, N processes (SO_REUSEPORT), uvloop",
    **{f"b{s}_n": f"(n) edge, seed {s}, serve --processes N" for s in ("000", "002", "003", "004", "004sale")},
    "batch": "(b) edge, POST /v1/events/batch, 500 events per request",
    "c": "(c) naive: one UPDATE links per click, one hot link",
    "d": "(d) worker drain vs write_batch ceiling",
    "e_full": "(e) end to end, full load (wrk, seed 000)",
    "e": "(e) end to end",
    "f": "(f) backlog drain after the workers were stopped",
    "g": "(g) memory",
    "i": "(i) idempotency keys: seed 003 with and without Idempotency-Key",
    "h_primary": "(h) edge, seed 000, REFSTREAM_ACK_DURABILITY=primary (own primary + replica)",
    "h_replicas1": "(h) edge, seed 000, REFSTREAM_ACK_DURABILITY=replicas:1 (same Redis)",
    "h": "(h) replicas:1 / primary",
    "m": "(m) MIGRATE of one partition (a stream of the bench's envelopes) against a string of its size",
    "r": "(r) archiver vs worker; Redis bytes across retention cycles (--only r)",
    "p": "(p) worker into a full events table vs an empty one; dropping a day",
    "cap_edge1": "(cap) the edge alone, 1 process, seed 000 (the part's own Redis)",
    "cap_edge2": "(cap) the edge alone, 2 processes (REFSTREAM_PROCESSES=2); scale = 2 / 1",
    "cap_w1": "(cap) 1 worker alone, on the backlog the 1-process edge left",
    "cap_w2": "(cap) 2 workers alone, on the backlog the 2-process edge left; scale = 2 / 1",
    "cap_idle": "(cap) 1 edge and 1 worker, no load: cores each kind spends doing nothing",
    "cap_hello": "(cap) bare aiohttp hello-world POST under the same wrk: CPU µs per request, the hello-world unit",
    "cap_full": "(cap) 1 edge and 1 worker under wrk's full load: CPU per event",
    "cap": "(cap) the steady run: 1 edge and 1 worker at half that load, open loop: CPU per event",
    "pgbytes": "(pgbytes) Postgres bytes per stored click, by relation (work --drain, then VACUUM)",
    "con_full": "(con) 1 edge, 1 worker and an idle console under wrk's full load (seed 000): the half rate's base",
    "con": "(con) ten open consoles at half that load, open loop: off and on windows alternating",
    "shards": "(shards) the worker's committed events/s, the workspaces on one Postgres primary and on two",
    "imp": "(imp) refstream import of --import-events rows beside live seed 000 clicks: live p99 with / without",
}


# -- (c) through the latency proxy (naive_part.py)
_C1MS_SECTIONS = {
    "c1ms": "(c) through the 1 ms latency proxy: naive, asyncpg's pool as shipped (2 round trips per click)",
    "c1ms_1rt": "(c) through the proxy: naive without the pool's reset query (1 round trip per click)",
    "c1ms_50": "(c) through the proxy: naive, 1 round trip per click, over 50 links (as b000) instead of one",
    "c1ms_edge": "(c) through the proxy: edge, seed 000; ratios against the fastest naive",
    "c1ms_half": "(c) through the proxy: fastest naive and edge at the same open-loop rate (half the slowest naive's)",
    "c1ms_e2e": "(c) through the proxy: edge and workers under full load (wrk, seed 000)",
}
SECTIONS = {
    k: v for key, title in SECTIONS.items() for k, v in ((key, title), *(_C1MS_SECTIONS.items() if key == "c" else ()))
}


# (con)'s figures of each window and pair: in its own table (``consoles``), not the main one
_CON_WINDOW = re.compile(r"con\.(?:off|on|pair)\d")


def medians(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in runs for k in r})
    return {k: round(statistics.median([r[k] for r in runs if k in r]), 3) for k in keys}


def finish(figures: dict[str, float]) -> None:
    """Figures derived from others (after the medians, so they stay consistent)."""
    per_event = [figures[k] for k in ("g.redis_bytes_per_event_f", "g.redis_bytes_per_event_b") if k in figures]
    if per_event:
        figures["g.redis_bytes_per_event"] = per_event[0]


def goals(figures: dict[str, float]) -> list[dict[str, Any]]:
    out = []
    for g in GOALS:
        value = figures.get(g.figure)
        out.append(
            {
                "goal": g.label,
                "figure": g.figure,
                "value": value,
                "target": f"{g.op} {g.target:g}",
                "met": None if value is None else g.met(value),
            }
        )
    return out


def record(result: dict[str, Any], command: str, quick: bool, results: Path | None = None) -> Path:
    """The run as a record in ``bench/results/`` (what ``bench.chart`` reads), named by its
    time: the date, the tree's commit, hello-world's µs a request, every median and the
    command. A quick run is recorded too, marked, and the chart leaves it out."""
    import datetime
    import subprocess

    import orjson

    root = Path(__file__).resolve().parent
    out_dir = results or root / "results"
    now = datetime.datetime.now(datetime.UTC)
    got = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True)
    commit = got.stdout.strip() if got.returncode == 0 else ""
    figures: dict[str, float] = result["figures"]
    hello = figures.get("cap_hello.us_per_request")
    if hello is None and figures.get("a.rps"):
        hello = round(1e6 * figures.get("a.server_cpu", 1.0) / figures["a.rps"], 2)
    entry = {
        "title": f"{command} ({now:%Y-%m-%d})",
        "kind": "run",
        "date": f"{now:%Y-%m-%d}",
        "committed_at": now.isoformat(timespec="seconds"),
        "commits": [commit] if commit else [],
        "quick": quick,
        "runs": len(result.get("per_run", [])),
        "command": command,
        "hello_world": {"us": hello} if hello else None,
        "figures": figures,
        "goals": result.get("goals", []),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{now:%Y-%m-%d-%H%M%S}-run{'-quick' if quick else ''}.json"
    path.write_bytes(orjson.dumps(entry, option=orjson.OPT_INDENT_2) + b"\n")
    return path


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.3g}" if v else "0"


def table(result: dict[str, Any], console: Console) -> None:
    figures: dict[str, float] = result["figures"]
    per_run: list[dict[str, float]] = result["per_run"]
    t = Table(title=f"refstream bench: medians of {len(per_run)} run(s)", show_lines=False)
    t.add_column("figure")
    t.add_column("median", justify="right")
    t.add_column("runs (min … max)", justify="right")
    for section, title in SECTIONS.items():
        rows = [k for k in figures if k.split(".")[0] == section and not _CON_WINDOW.match(k)]
        if not rows:
            continue
        t.add_section()
        t.add_row(f"[bold]{title}[/bold]", "", "")
        for k in rows:
            vals = [r[k] for r in per_run if k in r]
            spread = f"{_fmt(min(vals))} … {_fmt(max(vals))}" if len(vals) > 1 else ""
            t.add_row("  " + k, _fmt(figures[k]), spread)
    console.print(t)
    side_by_side(figures, console)
    capacity(figures, int(result.get("machine", {}).get("nproc") or 0), console)
    consoles(figures, console)
    g = Table(title="goals (from the issue)")
    for col in ("goal", "median", "target", "status"):
        g.add_column(col)
    for row in result["goals"]:
        status = "–" if row["met"] is None else "[green]met[/green]" if row["met"] else "[red]not met[/red]"
        g.add_row(row["goal"], "–" if row["value"] is None else _fmt(row["value"]), row["target"], status)
    console.print(g)
    for name, frames in result.get("profiles", {}).items():
        p = Table(title=f"py-spy: {name}, top frames by own time")
        p.add_column("own %", justify="right")
        p.add_column("frame")
        for pct, frame in frames:
            p.add_row(f"{pct:.1f}", frame)
        console.print(p)


def side_by_side(figures: dict[str, float], console: Console) -> None:
    """Part (n): hello-world and each dialect at 1 process and at N, with their ratios."""
    if "a_n.rps" not in figures:
        return
    n = int(figures.get("a_n.processes", 0))
    t = Table(title=f"1 process and N = {n} processes, side by side (req/s; wrk settings unchanged)")
    for col in ("", "1 process", f"{n} processes", f"{n} / 1", "/ hello at 1", f"/ hello at {n}"):
        t.add_column(col, justify="right" if col else "left")
    t.add_row("hello-world (a)", _fmt(figures["a.rps"]), _fmt(figures["a_n.rps"]), _fmt(figures["a_n.scale"]), "", "")
    for s in ("000", "002", "003", "004"):
        one, many = figures.get(f"b{s}.rps"), figures.get(f"b{s}_n.rps")
        if one is None or many is None:
            continue
        t.add_row(
            f"seed {s} (b)",
            _fmt(one),
            _fmt(many),
            _fmt(figures[f"b{s}_n.scale"]),
            _fmt(figures.get(f"b{s}.ratio_a", 0.0)),
            _fmt(figures.get(f"b{s}_n.ratio_a_n", 0.0)),
        )
    console.print(t)


_KINDS = (
    ("edge", "edge"),
    ("worker", "worker"),
    ("redis", "Redis"),
    ("pg", "Postgres"),
    ("pg_bg", "Postgres bg"),
    ("total", "total"),
)


def capacity(figures: dict[str, float], nproc: int, console: Console) -> None:
    """Part (cap): CPU per event of each kind of process in µs and in hello-worlds, Postgres
    bytes per stored event by relation, and 1 against 2 processes."""
    if "cap.accepted" not in figures:
        return
    hello = figures.get("cap_hello.us_per_request", 0.0)
    t = Table(
        title="(cap) CPU per event accepted (acc) and stored (sto), in µs and in hello-worlds (hw: µs ÷ the bare"
        f" aiohttp hello-world's {_fmt(hello)} µs per request in the same run), and cores used: in the steady run"
        " (half load), at full load, idle; Postgres: the database's backends; bg: its background writer,"
        " walwriter and checkpointer (the whole server's); total: without bg"
    )
    cols = ("", "half µs/acc", "µs/sto", "hw/sto", "cores", "full µs/acc", "µs/sto", "hw/sto", "cores", "idle")
    for col in cols:
        t.add_column(col, justify="right" if col else "left")
    for kind, label in _KINDS:
        row = [label]
        for phase in ("cap", "cap_full"):
            row += [
                _fmt(figures.get(f"{phase}.{kind}_us_per_accepted", 0.0)),
                _fmt(figures.get(f"{phase}.{kind}_us_per_stored", 0.0)),
                _fmt(figures.get(f"{phase}.{kind}_hw_per_stored", 0.0)),
            ]
            row.append(_fmt(figures[f"{phase}.{kind}_cores"]) if f"{phase}.{kind}_cores" in figures else "")
        row.append(_fmt(figures[f"cap_idle.{kind}_cores"]) if f"cap_idle.{kind}_cores" in figures else "")
        t.add_row(*row)
    console.print(t)
    relations = sorted(
        {k.split(".", 2)[2] for k in figures if k.startswith(("cap.bytes_per_stored.", "cap_full.bytes_per_stored."))}
        - {"total"},
        key=lambda r: -figures.get(f"cap.bytes_per_stored.{r}", 0.0),
    )
    b = Table(
        title="(cap) Postgres bytes per stored event by relation (partitions under their parent, TOAST under"
        " <table>_toast; main, free-space and visibility forks), over each window"
    )
    for col in ("relation", "half B/sto", "full B/sto"):
        b.add_column(col, justify="left" if col == "relation" else "right")
    for rel in (*relations, "total"):
        b.add_row(
            rel,
            *(_fmt(figures.get(f"{phase}.bytes_per_stored.{rel}", 0.0)) for phase in ("cap", "cap_full")),
        )
    console.print(b)
    s = Table(title="(cap) 1 process and 2, side by side (each ratio against the 1-process figure of the same run)")
    for col in ("", "1", "2", "2 / 1"):
        s.add_column(col, justify="right" if col else "left")
    for label, one, two, scale in (
        ("edge alone, accepted/s", "cap_edge1.accepted_per_s", "cap_edge2.accepted_per_s", "cap_edge2.scale"),
        ("workers alone, stored/s", "cap_w1.stored_per_s", "cap_w2.stored_per_s", "cap_w2.scale"),
    ):
        if one in figures and two in figures:
            s.add_row(label, _fmt(figures[one]), _fmt(figures[two]), _fmt(figures.get(scale, 0.0)))
    console.print(s)
    # 2 edge processes share the cores with wrk and Redis; 2 workers with Redis and Postgres
    if nproc and nproc < 2 + 2:
        console.print(
            f"On this {nproc}-core machine 2 processes and what they drive (the load generator, Redis,"
            " Postgres) need more cores than there are: 2 / 1 measures contention, not scaling."
        )


def consoles(figures: dict[str, float], console: Console) -> None:
    """Part (con): each window without consoles and with ten, in the order measured, then
    each condition over all its windows and what the ten added."""
    if "con.off.edge_cores" not in figures:
        return
    t = Table(
        title="(con) cores used over each window at half load, without consoles (off) and with ten open (on),"
        " in the order measured; redis: the bench's Redis (INFO cpu, other clients too), pg: the backends of the"
        " part's database, generator: the bench's process, browsers: the ten consoles' process;"
        " acc/s: clicks accepted, sto/s: rows stored, calls/s: the consoles' polls;"
        " + = on / off - 1, each on against the mean of the offs around it"
    )
    procs = ("edge", "worker", "console", "redis", "pg", "generator", "browsers")
    cols = ("window", *procs, "acc/s", "sto/s", "calls/s", "edge +", "worker +")
    for col in cols:
        t.add_column(col, justify="left" if col == "window" else "right")

    def row(label: str, name: str, added: tuple[str, str] = ("", "")) -> None:
        t.add_row(
            label,
            *(_fmt(figures[f"con.{name}.{k}_cores"]) for k in procs),
            *(_fmt(figures[f"con.{name}.{k}"]) for k in ("accepted_per_s", "stored_per_s", "calls_per_s")),
            *added,
        )

    n = 1
    while f"con.off{n}.edge_cores" in figures:
        row(f"off {n}", f"off{n}")
        if f"con.on{n}.edge_cores" in figures:
            row(f"on {n}", f"on{n}", (_added(figures, f"pair{n}.edge"), _added(figures, f"pair{n}.worker")))
        n += 1
    t.add_section()
    row("off, all", "off")
    row("on, all", "on", (f"[bold]{_added(figures, 'edge')}[/bold]", f"[bold]{_added(figures, 'worker')}[/bold]"))
    console.print(t)
    console.print(
        f"(con) ten consoles added {_added(figures, 'edge')} to the edge's CPU and {_added(figures, 'worker')} to"
        f" the worker's (goal ≤ 0.02 each); per event {figures.get('con.edge_added_per_event', 0.0):+.3f} and"
        f" {figures.get('con.worker_added_per_event', 0.0):+.3f}; the console itself"
        f" {figures['con.console_added_cores']:+.3f} cores ({figures.get('con.console_added_share', 0.0):+.3f} of the"
        f" edge's and the worker's without); {_fmt(figures['con.rate_per_s'])} clicks/s asked;"
        f" load average {figures.get('con.load_1m', 0.0):.2f}; load held (accepted/s on / off)"
        f" {figures.get('con.load_held', 0.0):.3f}"
    )


def _added(figures: dict[str, float], name: str) -> str:
    return f"{figures[f'con.{name}_added']:+.3f}"


def top_frames(raw_path: str, n: int = 10) -> list[tuple[float, str]]:
    """The leaf frames of py-spy's raw (collapsed) stacks, by share of samples."""
    own: dict[str, int] = {}
    total = 0
    path = Path(raw_path)
    if not path.exists():
        return []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        own[leaf] = own.get(leaf, 0) + int(count)
        total += int(count)
    ranked = sorted(own.items(), key=lambda kv: -kv[1])[:n]
    return [(100 * c / total, f) for f, c in ranked] if total else []
