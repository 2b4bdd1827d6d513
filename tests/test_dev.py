"""`refstream dev` with no reachable servers: embedded Redis and Postgres, demo data, the
edge and a worker; the curl it prints moves the counter `link show` reports; and when dev
is SIGKILLed, nothing it started survives."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import orjson

from ._procs import REFSTREAM, free_port
from .conftest import wait_for


def listening(url: str) -> bool:
    m = re.search(r"127\.0\.0\.1:(\d+)", url)
    assert m, url
    try:
        with socket.create_connection(("127.0.0.1", int(m.group(1))), timeout=0.5):
            return True
    except OSError:
        return False


async def test_dev_prints_a_curl_that_moves_the_counter_and_cleans_up_when_killed(tmp_path: Path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFSTREAM_")}
    env.update(
        REDIS_URL="redis://127.0.0.1:1/0",
        DATABASE_URL="postgresql://postgres@127.0.0.1:1/x",
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
    )
    log = open(tmp_path / "dev.err", "wb")
    dev = subprocess.Popen([REFSTREAM, "dev", "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=log)
    assert dev.stdout is not None
    printed: list[str] = []
    try:
        while not printed or "Ctrl-C" not in printed[-1]:
            line = await asyncio.to_thread(dev.stdout.readline)
            assert line, f"dev exited early: {(tmp_path / 'dev.err').read_text()[-3000:]}"
            printed.append(line.decode())
        text = "".join(printed)
        curl = next(line.strip() for line in printed if line.strip().startswith("curl "))
        show = next(line.strip() for line in printed if "refstream link show" in line)
        urls = re.findall(r"(?:redis|postgresql)://\S+", text)
        assert len(urls) >= 2 and all(listening(u) for u in urls), text

        out = subprocess.run(["bash", "-c", curl], capture_output=True, env=env, timeout=30)
        assert orjson.loads(out.stdout) == {"success": True, "data": {"tracked": True}}

        async def clicks() -> int:
            res = await asyncio.to_thread(subprocess.run, ["bash", "-c", show], capture_output=True, env=env)
            return res.returncode == 0 and orjson.loads(res.stdout)["clicks"] == 1

        await wait_for(clicks, timeout=30, what="the demo link to count the click")
    finally:
        dev.send_signal(signal.SIGKILL)
        dev.wait()
        log.close()

    async def all_gone() -> bool:
        return not any(listening(u) for u in [*urls, f"http://127.0.0.1:{port}"])

    await wait_for(all_gone, timeout=30, what="embedded servers, edge and worker to stop")
