"""A TCP proxy that puts a fixed delay on every chunk, each way, as a network between an
app and its database would: the bench runs it as its own process
(``python -m bench.proxy --port P --upstream HOST:PORT --delay-ms 0.5``) so that
its CPU is counted apart, and points the apps' ``DATABASE_URL`` at it.

Each chunk read from one side is written to the other side no earlier than ``delay`` after
it was read, in the order it was read (one queue for all, never reordered: with one delay
for every chunk, read order is due order); an EOF or a close travels the same queue, after
the bytes before it. The delay is a lower bound:
the event loop's wake-up adds a little (the bench measures the round trip it really adds).

The loop polls with ``select()``: its timeout has microsecond resolution, where epoll's (the
default selector) and libuv's timers (uvloop) round to whole milliseconds, which would turn
0.5 ms into 1 ms or into nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import selectors
import signal
import socket
from collections import deque

_PR_SET_TIMERSLACK = 29


class _DelayLine:
    """Every chunk of every connection, in the order read. With one delay for all, that is also
    the order they fall due, so one queue and one timer serve the whole proxy, and each wake-up
    writes everything due by then (a connection's chunks joined, in order)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self.loop = loop
        self.delay = delay
        self.queue: deque[tuple[float, _Side, bytes | None]] = deque()  # None: close that side
        self.timer: asyncio.TimerHandle | None = None

    def put(self, side: _Side, data: bytes | None) -> None:
        due = self.loop.time() + self.delay
        self.queue.append((due, side, data))
        if self.timer is None:
            self.timer = self.loop.call_at(due, self._flush)

    def _flush(self) -> None:
        self.timer = None
        now = self.loop.time()
        out: dict[_Side, list[bytes]] = {}
        queue = self.queue
        while queue and queue[0][0] <= now:
            _, side, data = queue.popleft()
            if data is None:
                side.write(out.pop(side, []))
                side.close()
            else:
                out.setdefault(side, []).append(data)
        for side, chunks in out.items():
            side.write(chunks)
        if queue:
            self.timer = self.loop.call_at(queue[0][0], self._flush)


class _Side(asyncio.Protocol):
    """One connection of a pair: what it receives goes, through the delay line, to its peer."""

    def __init__(self, line: _DelayLine) -> None:
        self.line = line
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=1 << 20)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None:
            self.line.put(self.peer, data)

    def eof_received(self) -> bool:
        if self.peer is not None:
            self.line.put(self.peer, None)
        return True  # keep our write side open until the peer's EOF or close arrives

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.peer is not None and not self.peer.closed:
            self.line.put(self.peer, None)

    def pause_writing(self) -> None:  # our peer sends faster than we can write: stop reading it
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.closed:
            self.peer.transport.resume_reading()

    def write(self, chunks: list[bytes]) -> None:
        if chunks and not self.closed and self.transport is not None and not self.transport.is_closing():
            self.transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.close()
        self.closed = True


class _Client(_Side):
    """The client's side: reads nothing until the upstream connection is there."""

    def __init__(self, line: _DelayLine, proxy: LatencyProxy) -> None:
        super().__init__(line)
        self.proxy = proxy

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        self.proxy.connections += 1
        self.proxy.tasks.add(task := asyncio.get_running_loop().create_task(self.proxy.connect(self)))
        task.add_done_callback(self.proxy.tasks.discard)


class LatencyProxy:
    """Accepts on ``port`` and connects each client to ``upstream``, ``delay`` seconds each way."""

    def __init__(self, upstream: tuple[str, int], delay: float) -> None:
        self.upstream = upstream
        self.delay = delay
        self.connections = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self._line: _DelayLine | None = None

    def _client(self) -> _Side:
        assert self._line is not None
        return _Client(self._line, self)

    async def connect(self, client: _Side) -> None:
        assert client.transport is not None and self._line is not None
        up = _Side(self._line)
        try:
            await asyncio.get_running_loop().create_connection(lambda: up, *self.upstream)
        except OSError:
            client.transport.close()
            return
        client.peer, up.peer = up, client
        if client.closed:
            up.close()
        else:
            client.transport.resume_reading()

    async def serve(self, host: str, port: int, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        self._line = _DelayLine(loop, self.delay)
        server = await loop.create_server(self._client, host, port, backlog=1024)
        async with server:
            await stop.wait()


def new_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose timers wake within microseconds, not milliseconds."""
    _tight_timers()
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


def _tight_timers() -> None:
    """Linux lets a sleeping process wake up to 50 µs late (its timer slack), per wake-up;
    1 ns asks for no slack. Elsewhere, or where refused, the slack stays."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_TIMERSLACK, ctypes.c_ulong(1), 0, 0, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--upstream", required=True, help="HOST:PORT")
    parser.add_argument("--delay-ms", type=float, default=0.5, help="each way")
    args = parser.parse_args()
    host, _, port = args.upstream.rpartition(":")
    proxy = LatencyProxy((host, int(port)), args.delay_ms / 1000)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await proxy.serve(args.host, args.port, stop)

    loop = new_loop()
    with contextlib.closing(loop):
        loop.run_until_complete(run())


if __name__ == "__main__":
    main()
