"""Whole-server ``/metrics`` under ``refstream serve --processes N``.

A scrape lands on whichever edge process the kernel gave the connection to, so each answers
for all of them: every process serves its own exposition on a private Unix socket in the
server's runtime directory (``edge-<pid>.sock``), and the ``/metrics`` route of any of them
reads its siblings' text and merges it with its own (``merge``).

What a process counted is not lost when it leaves: a process that drains (SIGTERM, or
replaced by a reload) writes its final exposition as ``edge-<pid>.prom`` before it goes, and
its counters and histograms stay in the sums (as prometheus_client's multiprocess mode
keeps dead processes' counters), so a reload never shows Prometheus a counter going back.
A SIGKILLed process writes nothing: its counts leave the sums (Prometheus reads that as a
counter reset).

How samples merge, by family type: counters, histograms and summaries are summed by
labels (their ``_created`` takes the earliest); gauges are summed, except those in
``SHARED_GAUGES``, which describe one thing every process sees (the spool directory they
share) and take the largest value.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Iterable, Iterator
from contextlib import suppress
from pathlib import Path

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

log = structlog.get_logger("ingest.siblings")

# the spool is one directory shared by every process: each reports the same totals
SHARED_GAUGES = frozenset({"refstream_spool_bytes", "refstream_spool_entries", "refstream_spool_failing"})
FETCH_TIMEOUT_S = 2.0  # a sibling busy under load still answers well within this
_SUFFIX_ORDER = {"_bucket": 0, "_total": 0, "_count": 1, "_sum": 2, "_gcount": 3, "_gsum": 4, "_created": 5}


class Siblings:
    """This process's place in the runtime directory: its own exposition socket, its
    siblings' sockets and the final expositions of those that left."""

    def __init__(self, rundir: str | Path, pid: int | None = None) -> None:
        self.dir = Path(rundir)
        self.pid = os.getpid() if pid is None else pid
        self._server: asyncio.AbstractServer | None = None

    @property
    def socket_path(self) -> Path:
        return self.dir / f"edge-{self.pid}.sock"

    async def expose(self, registry: CollectorRegistry) -> None:
        """Answer every connection on our socket with our exposition, then close it."""

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                writer.write(generate_latest(registry))
                await writer.drain()
            except OSError:
                pass  # the asking sibling gave up
            finally:
                writer.close()

        with suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._server = await asyncio.start_unix_server(answer, path=str(self.socket_path))

    async def retire(self, registry: CollectorRegistry) -> None:
        """Leave: our final exposition stays for the sums (written before the socket goes,
        so no scrape sees neither), then the socket closes."""
        final = self.dir / f"edge-{self.pid}.prom"
        tmp = final.with_suffix(".tmp")
        try:
            tmp.write_bytes(generate_latest(registry))
            tmp.rename(final)
        except OSError as exc:  # the runtime directory is gone: the server is stopping
            log.warning("metrics.retire_failed", error=exc)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with suppress(FileNotFoundError):
            self.socket_path.unlink()

    async def gather(self, own: bytes) -> bytes:
        """The whole server's exposition: ours (``own``) merged with every live sibling's
        and every retired one's counters."""
        try:
            names = os.listdir(self.dir)
        except OSError:
            return own
        retired = {n[len("edge-") : -len(".prom")] for n in names if n.startswith("edge-") and n.endswith(".prom")}
        live = [
            n
            for n in names
            if n.startswith("edge-")
            and n.endswith(".sock")
            and n != self.socket_path.name
            and n[len("edge-") : -len(".sock")] not in retired
        ]
        texts = await asyncio.gather(*(_fetch(self.dir / n) for n in live))
        answered = [own.decode()] + [t for t in texts if t is not None]
        finals: list[str] = []
        for pid in retired:
            with suppress(OSError):
                finals.append((self.dir / f"edge-{pid}.prom").read_text())
        return merge(answered, finals)


async def _fetch(path: Path) -> str | None:
    """A sibling's exposition; None when it is gone (its socket refused) or does not answer."""
    try:
        async with asyncio.timeout(FETCH_TIMEOUT_S):
            reader, writer = await asyncio.open_unix_connection(str(path))
            try:
                data = await reader.read()
            finally:
                writer.close()
        return data.decode()
    except (OSError, TimeoutError):
        return None


def merge(live: Iterable[str], retired: Iterable[str] = ()) -> bytes:
    """One Prometheus text exposition from several: ``live`` processes' (every family) and
    ``retired`` ones' (their counters, histograms and summaries only: a gauge of a process
    that left describes nothing now)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    processes = 0
    for text, is_live in [*((t, True) for t in live), *((t, False) for t in retired)]:
        processes += is_live
        for fam in text_string_to_metric_families(text):
            if not is_live and fam.type in ("gauge", "info", "stateset", "unknown"):
                continue
            known = families.setdefault(fam.name, fam)
            acc = values.setdefault(fam.name, {})
            largest = known.type == "gauge" and fam.name in SHARED_GAUGES
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                old = acc.get(key)
                if old is None:
                    acc[key] = s.value
                elif s.name.endswith("_created"):
                    acc[key] = min(old, s.value)
                elif largest:
                    acc[key] = max(old, s.value)
                else:
                    acc[key] = old + s.value
    merged: list[Metric] = []
    for name, fam in families.items():
        out = Metric(name, fam.documentation, fam.type, fam.unit)
        ordered = sorted(values[name].items(), key=_order)
        out.samples = [Sample(sname, dict(labels), v) for (sname, labels), v in ordered]
        merged.append(out)
    merged.append(
        GaugeMetricFamily("refstream_edge_processes", "Edge processes whose metrics this answer sums", value=processes)
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(merged))
    return generate_latest(registry)


def _order(item: tuple[tuple[str, tuple[tuple[str, str], ...]], float]) -> tuple[object, ...]:
    """Samples grouped by label set (``le`` aside), histogram buckets ascending, then the
    family's other suffixes in the order prometheus_client writes them."""
    (name, labels), _ = item
    rest = tuple(kv for kv in labels if kv[0] != "le")
    le = next((v for k, v in labels if k == "le"), None)
    suffix = next((o for suf, o in _SUFFIX_ORDER.items() if name.endswith(suf)), 0)
    return (rest, suffix, math.inf if le in (None, "+Inf") else float(le), name)


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


SIBLINGS = web.AppKey("siblings", Siblings)
