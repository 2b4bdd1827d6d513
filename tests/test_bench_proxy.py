"""The bench's latency proxy (``python -m bench.proxy``), run as the bench runs it,
between this test and an echo server: bytes pass both ways intact and in order, each round
trip takes at least the two delays, and closing one side closes the other."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from refstream.embedded import free_port

# no server-specific behaviour: scripts/test runs it in the first pass only
pytestmark = pytest.mark.once

DELAY_MS = 20.0


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _connect(port: int, proc: subprocess.Popen[bytes]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    for _ in range(500):
        assert proc.poll() is None, "the proxy exited"
        try:
            return await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.02)  # polling for the child's listening socket: nothing to await
    raise AssertionError("the proxy never listened")


@pytest.mark.timeout(60)
async def test_proxy_passes_bytes_in_order_both_ways_after_the_delay():
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.proxy",
            "--port",
            str(port),
            "--upstream",
            f"127.0.0.1:{echo_port}",
            "--delay-ms",
            str(DELAY_MS),
        ],
    )
    try:
        reader, writer = await _connect(port, proc)
        # one round trip: two delays at least
        start = time.monotonic()
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        assert time.monotonic() - start >= 2 * DELAY_MS / 1000

        # many chunks, written without waiting, of every byte value: back whole and in order
        chunks = [bytes([i % 256]) * (1 + (i * 7919) % 5000) + os.urandom(i % 64) for i in range(300)]
        sent = b"".join(chunks)

        async def send() -> None:
            for c in chunks:
                writer.write(c)
                await writer.drain()

        sender = asyncio.create_task(send())
        got = await reader.readexactly(len(sent))
        await sender
        assert got == sent

        # the client's close reaches the server, whose close comes back as EOF
        writer.write_eof()
        assert await reader.read() == b""
        writer.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        echo.close()
        await echo.wait_closed()
