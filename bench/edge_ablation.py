"""Where the edge's CPU a click goes, by taking parts away: the seed 000 click route (part b000)
served by copies of this tree, each with one part of the route cut out, against bare aiohttp
(part a) in the same run. ``python -m bench.edge_ablation [--rounds 3] [--duration 8]
[--warmup 2] [--cuts NAME,...]``.

A sampling profiler cannot say this: the route's coroutines resume from the event loop's C
code, so py-spy loses their callers on many samples, and what it keeps is spread over a
hundred functions of a few per cent each. A cut says what a part costs in all: its own
Python, the loop's callbacks and system calls it causes, the allocations it leaves behind.

Each cut (``CUTS``) is a set of text replacements in a copy of the tree's packages (made
under a temporary directory, dropped after); every replacement must find its text exactly
once, so a cut whose code has changed shape fails the run rather than measuring nothing.
Each round runs ``python -m bench --only a,b000 --runs 1`` once per cut, in turn, with the
copy first on ``PYTHONPATH`` (the edge, ``refstream serve``, imports the copy). Printed: per
cut, the median edge CPU µs a request, hello-world's, the ratio of the two (each run's
within itself) and what the cut took off the whole route. The cuts answer wrongly (a click
answered without its append, a reply taken from another request): they are measurements,
never a build.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the lookup's round trip answered from the first reply it got, kept (the checked append's
# reply: the same link, flag and verdict shape every time): no batcher, no socket, no wait
_CANNED_REPLY = (
    "ingest/edge/lookup.py",
    """        replies = await edge.batcher.execute(
            checked, durable=True, check=lambda r: well_formed(r[0], flags=1, values=n_values)
        )
""",
    """        global _CANNED
        if _CANNED is None:
            _CANNED = await edge.batcher.execute(
                checked, durable=True, check=lambda r: well_formed(r[0], flags=1, values=n_values)
            )
        replies = _CANNED
""",
)
_CANNED_GLOBALS = (
    "ingest/edge/lookup.py",
    "\n\ndef _gets(extra",
    "\n\n_CANNED = None\n_CHECKED = None\n\n\ndef _gets(extra",
)
# the script call built once and kept (its entry, keys and arguments)
_CANNED_CALL = (
    "ingest/edge/lookup.py",
    "    checked = _checked(ask, guess)\n",
    """    global _CHECKED
    if _CHECKED is None:
        _CHECKED = _checked(ask, guess)
    checked = _CHECKED
""",
)
# the click answered once its body is read: no lookup, envelope, refusals or answer headers
_NO_LOOKUP = (
    "ingest/edge/routes/biore.py",
    '    flag = edge.keys.flag("referral")\n',
    '    return accept.accepted(TRACKED, {})\n    flag = edge.keys.flag("referral")\n',
)
# the route's wrapper as a bare pass-through (no request id, CORS, guard, metrics, log)
_NO_WRAPPER = (
    "ingest/host/wrap.py",
    "        async def wrapper(request: web.Request) -> web.StreamResponse:\n",
    "        async def wrapper(request: web.Request) -> web.StreamResponse:\n"
    "            return await handler(request)\n",
)

WHOLE = "nothing cut"
CUTS: dict[str, tuple[tuple[str, str, str], ...]] = {
    WHOLE: (),
    "the Redis round trip (a canned reply)": (_CANNED_REPLY, _CANNED_GLOBALS),
    "the round trip and the script call's making": (_CANNED_REPLY, _CANNED_GLOBALS, _CANNED_CALL),
    "the lookup and all after the body": (_NO_LOOKUP,),
    "the route's wrapper": (_NO_WRAPPER,),
    "the lookup and the route's wrapper": (_NO_LOOKUP, _NO_WRAPPER),
}


def make_copy(cut: tuple[tuple[str, str, str], ...], into: Path) -> Path:
    """This tree's ``ingest`` with ``cut``'s replacements, under ``into``; its ``workers``,
    ``refstream`` and ``bench`` as they are (the bench runs from the copy)."""
    for pkg in ("ingest", "workers", "refstream", "bench"):
        shutil.copytree(ROOT / pkg, into / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "schema.sql", into / "schema.sql")
    for rel, old, new in cut:
        path = into / rel
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"{rel}: the text a cut replaces is not there once ({text.count(old)}): {old[:60]!r}")
        path.write_text(text.replace(old, new))
    return into


def measure(copy: Path, duration: float, warmup: float, out: Path) -> tuple[float, float]:
    """(hello-world's, the edge's) server CPU µs a request, from one ``--only a,b000`` run."""
    cmd = [sys.executable, "-m", "bench", "--only", "a,b000", "--runs", "1"]
    cmd += ["--duration", str(duration), "--warmup", str(warmup), "--json-out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(copy)}
    done = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, timeout=900, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the bench failed in {copy}:\n{done.stdout.decode()[-2000:]}{done.stderr.decode()[-2000:]}")
    f = json.loads(out.read_text())["figures"]
    return f["a.server_cpu"] / f["a.rps"] * 1e6, f["b000.server_cpu"] / f["b000.rps"] * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--cuts", default=",".join(CUTS), help="comma-separated names of CUTS")
    args = ap.parse_args()
    names = [n.strip() for n in args.cuts.split(",") if n.strip()]
    unknown = [n for n in names if n not in CUTS]
    if unknown:
        raise SystemExit(f"no such cut: {unknown}; the cuts: {list(CUTS)}")
    if WHOLE not in names:
        names.insert(0, WHOLE)
    runs: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="refstream-ablation-") as tmp:
        copies = {n: make_copy(CUTS[n], Path(tmp) / f"cut{i}") for i, n in enumerate(names)}
        for r in range(args.rounds):
            for n in names:
                runs[n].append(measure(copies[n], args.duration, args.warmup, copies[n] / f"round{r}.json"))
                hello, edge = runs[n][-1]
                print(f"[round {r + 1}] {n}: edge {edge:.1f} µs a request, hello-world {hello:.1f}", flush=True)
    whole = statistics.median(e for _, e in runs[WHOLE])
    print(f"\nthe seed 000 click route, CPU µs a request, medians of {args.rounds}", end=" ")
    print("(the ratio: each run's edge ÷ its own hello-world):")
    print(f"  {'cut':<46} {'edge µs':>8} {'hello µs':>9} {'ratio':>6} {'taken off':>10}")
    for n in names:
        edge = statistics.median(e for _, e in runs[n])
        hello = statistics.median(h for h, _ in runs[n])
        ratio = statistics.median(e / h for h, e in runs[n])
        print(f"  {n:<46} {edge:8.1f} {hello:9.1f} {ratio:6.2f} {edge - whole:+10.1f}")


if __name__ == "__main__":
    main()
