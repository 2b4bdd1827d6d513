"""A TCP proxy a test runs in its own event loop, between a client and a server, to break
the network without touching either: ``blackhole()`` keeps every connection (and every new
one) open and silently discards what either side sends, as a partition without resets
does; ``blackhole("up")`` discards only what the client sends (the server never hears it),
``blackhole("down")`` only what the server answers (it executes, the client never learns
it did: an unknown outcome); ``heal()`` closes the connections that lost bytes (their byte
streams are broken, and their clients gave up on them already) and forwards again.
``delay_s`` holds every chunk that long before forwarding it, in order (a slow link).

Directions: ``up`` is client to server, ``down`` server to client."""

from __future__ import annotations

import asyncio
import contextlib

from refstream.embedded import free_port


class Proxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.holed_dirs: frozenset[str] = frozenset()
        self.delay_s = 0.0
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.dropped = 0  # bytes discarded while blackholed

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    @property
    def holed(self) -> bool:
        return bool(self.holed_dirs)

    def blackhole(self, direction: str = "both") -> None:
        """Discard what goes ``up``, ``down`` or ``both`` ways, on every connection and new ones."""
        if direction not in ("up", "down", "both"):
            raise ValueError(f"direction: up, down or both, not {direction!r}")
        self.holed_dirs = frozenset(("up", "down") if direction == "both" else (direction,))

    def heal(self) -> None:
        """Forward both ways again (``delay_s`` is left as it is)."""
        self.holed_dirs = frozenset()
        for a, b in list(self._pairs):
            if getattr(a, "_holed", False) or getattr(b, "_holed", False):
                a.close()
                b.close()
                self._pairs.discard((a, b))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        pair = (writer, up_w)
        self._pairs.add(pair)
        for src, dst, direction in ((reader, up_w, "up"), (up_r, writer, "down")):
            task = asyncio.create_task(self._pipe(src, dst, writer, direction))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, client: asyncio.StreamWriter, direction: str
    ) -> None:
        try:
            while data := await src.read(65536):
                if direction in self.holed_dirs:
                    client._holed = True  # type: ignore[attr-defined]  # this stream lost bytes: heal() closes it
                    self.dropped += len(data)
                    continue
                if self.delay_s > 0:
                    await asyncio.sleep(self.delay_s)
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            dst.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for a, b in list(self._pairs):
            a.close()
            b.close()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
