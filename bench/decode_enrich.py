"""The worker's per-event Python before Postgres, alone: decoding a stream entry
(``wire.from_entry`` and ``bounds.check``, as ``Pipeline._decode``) and enriching it (the
``Enricher`` calls the store makes), per 10,000 events of part (cap)'s traffic, caches
warm as in a running worker. ``python -m bench.decode_enrich [--base TREE]``.

``--base`` loads another checkout's ``wire`` and ``enrich`` modules (main's, in a second
worktree) beside this tree's, and times the two alternately in one process, so a noisy
machine slows both alike: the figure to read is the ratio. The other modules are this
tree's for both.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from ingest.contract import bounds, wire
from ingest.contract.events import Dialect, Envelope, EventType
from workers.consumer import enrich

from .world import REFERRER, UAS, client_ip

EVENTS = 10_000
ROUNDS = 9
Run = Callable[[], None]


def traffic(clicks: float, n: int = EVENTS) -> list[Envelope]:
    """Part (cap)'s bio.re clicks (its addresses, its browsers and a bot), a share
    ``1 - clicks`` of them leads instead (server to server: the address, no enrichment)."""
    rng, out = random.Random(0), []
    for i in range(n):
        if rng.random() < clicks:
            payload: dict[str, Any] = {"code": f"c{i % 50}", "referrer": REFERRER}
            out.append(Envelope(EventType.CLICK, Dialect.BIORE, payload, None, client_ip(i), UAS[i % len(UAS)]))
        else:
            payload = {"code": f"c{i % 50}", "name": "Sign Up", "external_id": f"u{i}"}
            out.append(Envelope(EventType.LEAD, Dialect.REFPORT, payload, None, client_ip(i)))
    return out


def as_read(e: Envelope) -> dict[bytes, bytes]:
    """The entry's fields as redis-py returns them (integers as text)."""
    return {k: v if isinstance(v, bytes) else str(v).encode() for k, v in wire.to_entry_dict(e).items()}


def decoding(w: ModuleType, entries: list[dict[bytes, bytes]]) -> Run:
    def run() -> None:
        for fields in entries:
            bounds.check(w.from_entry(fields).payload)

    return run


def enriching(enricher: Any, envelopes: list[Envelope]) -> Run:
    """What the store asks the enricher per event: a click's enrichment, else only the
    address as stored (``stored_ip``; main's store read it off a whole enrichment)."""
    stored_ip = getattr(enricher, "stored_ip", None) or (
        lambda ip, policy: enricher.enrich_row(ip, None, None, policy).ip
    )

    def run() -> None:
        for e in envelopes:
            if e.type is EventType.CLICK:
                enricher.enrich_row(e.ip, e.user_agent, e.payload.get("referrer"), "full")
            else:
                stored_ip(e.ip, "full")

    return run


def timed(runs: dict[str, Run]) -> dict[str, float]:
    """Median CPU seconds of each run, the runs taking turns, once each to warm first."""
    for run in runs.values():
        run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(ROUNDS):
        for name, run in runs.items():
            start = time.process_time()
            run()
            seconds[name].append(time.process_time() - start)
    return {name: statistics.median(s) for name, s in seconds.items()}


def load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not a module")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_enrich", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="another checkout, timed beside this one")
    args = parser.parse_args()
    trees: dict[str, tuple[ModuleType, ModuleType]] = {"this tree": (wire, enrich)}
    if args.base is not None:
        base = args.base.resolve()
        trees = {
            "base": (
                load("base_wire", base / "ingest/contract/wire.py"),
                load("base_enrich", base / "workers/consumer/enrich.py"),
            ),
            **trees,
        }
    enrichers = {name: e.Enricher() for name, (_, e) in trees.items()}
    for label, clicks in (("part (cap)'s clicks", 1.0), ("80 % clicks, 20 % leads", 0.8)):
        envelopes = traffic(clicks)
        entries = [as_read(e) for e in envelopes]
        stages = {
            "decode": {t: decoding(w, entries) for t, (w, _) in trees.items()},
            "enrich": {t: enriching(enrichers[t], envelopes) for t in trees},
        }
        for stage, runs in stages.items():
            ms = {t: 1000 * s for t, s in timed(runs).items()}
            line = ", ".join(f"{t} {v:.1f} ms" for t, v in ms.items())
            ratio = f"; this tree ÷ base {ms['this tree'] / ms['base']:.2f}" if "base" in ms else ""
            print(f"{label}, {stage}: {line} per {EVENTS:,} events{ratio}")


if __name__ == "__main__":
    main()
