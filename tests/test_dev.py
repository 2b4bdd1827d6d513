"""`refstream dev` with no reachable servers: embedded Redis and Postgres, demo data, the
edge and a worker; the curl it prints moves the counter `link show` reports, and both run
as printed (refstream need not be on PATH); when dev is SIGKILLed, nothing it started
survives. With ``--data DIR`` a second run finds the first one's demo data, API key and
secret key; without, a run that finds the demo workspace prints how to make a key. arq's
job lines are debug lines."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from refstream.services import Services, with_database

from ._procs import REFSTREAM, Procs, dev_ports, env_for, free_port
from .conftest import drop_database, wait_for


def listening(url: str) -> bool:
    m = re.search(r"127\.0\.0\.1:(\d+)", url)
    assert m, url
    try:
        with socket.create_connection(("127.0.0.1", int(m.group(1))), timeout=0.5):
            return True
    except OSError:
        return False


async def test_dev_prints_a_curl_that_moves_the_counter_and_cleans_up_when_killed(tmp_path: Path):
    ports = dev_ports()
    port = int(ports[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFSTREAM_")}
    env.update(REDIS_URL="redis://127.0.0.1:1/0", DATABASE_URL="postgresql://postgres@127.0.0.1:1/x")
    # not on PATH: the commands it prints must say where it is
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if p and p != str(Path(REFSTREAM).parent))
    log = open(tmp_path / "dev.err", "wb")
    # in a directory of its own: dev writes the tour's .refstream-dev.env where it runs
    dev = subprocess.Popen([REFSTREAM, "dev", *ports], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=log)
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
        assert " refstream link show" not in show, show  # a path to it, since it is not on PATH
        urls = re.findall(r"(?:redis|postgresql)://\S+", text)
        assert len(urls) >= 2 and all(listening(u) for u in urls), text

        out = subprocess.run(["bash", "-c", curl], capture_output=True, env=env, timeout=30)
        assert orjson.loads(out.stdout) == {"success": True, "data": {"tracked": True}}

        async def clicks() -> int:
            # the printed command as printed shows a table; the same with --json, for this test
            res = await asyncio.to_thread(subprocess.run, ["bash", "-c", show], capture_output=True, env=env)
            if res.returncode != 0 or b"clicks" not in res.stdout:
                return False
            res = await asyncio.to_thread(
                subprocess.run, ["bash", "-c", show + " --json"], capture_output=True, env=env
            )
            return res.returncode == 0 and orjson.loads(res.stdout)["clicks"] == 1

        await wait_for(clicks, timeout=30, what="the demo link to count the click")

        # the console, at the address and with the token the banner gives
        m = re.search(r"console on (http://127\.0\.0\.1:\d+)/ \(operator token (\S+);", text)
        assert m, text
        console, token = m.group(1), m.group(2)
        async with aiohttp.ClientSession() as http:
            for headers, status in (({}, 401), ({"Authorization": f"Bearer {token}"}, 200)):
                async with http.get(f"{console}/api/pipeline", headers=headers) as r:
                    assert r.status == status
    finally:
        dev.send_signal(signal.SIGKILL)
        dev.wait()
        log.close()

    async def all_gone() -> bool:
        return not any(listening(u) for u in [*urls, f"http://127.0.0.1:{port}", console])

    await wait_for(all_gone, timeout=30, what="embedded servers, edge, worker and console to stop")


async def read_banner(dev: subprocess.Popen[bytes], errors: Path) -> list[str]:
    """dev's stdout up to its last banner line."""
    assert dev.stdout is not None
    printed: list[str] = []
    while not printed or "Ctrl-C" not in printed[-1]:
        line = await asyncio.to_thread(dev.stdout.readline)
        assert line, f"dev exited early: {errors.read_text()[-3000:]}"
        printed.append(line.decode())
    return printed


def start_dev(args: list[str], env: dict[str, str], errors: Path) -> subprocess.Popen[bytes]:
    with open(errors, "ab") as log:  # run beside its errors: dev writes .refstream-dev.env where it runs
        return subprocess.Popen(
            [REFSTREAM, "dev", *args], cwd=errors.parent, env=env, stdout=subprocess.PIPE, stderr=log
        )


async def stop_dev(dev: subprocess.Popen[bytes]) -> None:
    """Ctrl-C, and its clean exit: children stopped, servers shut down."""
    dev.send_signal(signal.SIGINT)
    try:
        await asyncio.to_thread(dev.wait, 60)
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait()


def after(lines: list[str], marker: str) -> str:
    return next(line.split(marker, 1)[1].strip() for line in lines if marker in line)


async def test_dev_with_data_keeps_its_demo_data_api_key_and_secret_key_across_runs(tmp_path: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="refstream-devdata-"))
    os.chmod(base, 0o755)  # the embedded Postgres runs as nobody when we are root: it must reach DIR
    data = base / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFSTREAM_")}
    env.update(REDIS_URL="redis://127.0.0.1:1/0", DATABASE_URL="postgresql://postgres@127.0.0.1:1/x")
    errors = tmp_path / "dev.err"
    runs: list[dict[str, str]] = []
    try:
        for run in range(2):
            dev = start_dev([*dev_ports(), "--data", str(data)], env, errors)
            try:
                printed = await read_banner(dev, errors)
                text = "".join(printed)
                assert f"kept in {data / 'embedded'}" in text, text
                runs.append(
                    {
                        "api_key": after(printed, f"(scope *, kept in {data / 'api_key'}):"),
                        "secret": after(printed, "REFSTREAM_SECRET_KEY=").split()[0],
                        "show": next(line.strip() for line in printed if "refstream link show" in line),
                    }
                )
                if run == 0:
                    curl = next(line.strip() for line in printed if line.strip().startswith("curl "))
                    out = subprocess.run(["bash", "-c", curl], capture_output=True, timeout=30)
                    assert orjson.loads(out.stdout)["success"] is True

                async def clicks() -> bool:
                    res = await asyncio.to_thread(
                        subprocess.run, ["bash", "-c", runs[-1]["show"] + " --json"], capture_output=True, env=env
                    )
                    return res.returncode == 0 and orjson.loads(res.stdout)["clicks"] == 1

                # the first run counts the click; the second finds it counted
                await wait_for(clicks, timeout=30, what=f"the demo link's click (run {run + 1})")
            finally:
                await stop_dev(dev)
            assert dev.returncode == 0, errors.read_text()[-3000:]
        assert runs[0]["api_key"] == runs[1]["api_key"] and runs[0]["api_key"].startswith("rs_live_")
        assert runs[0]["secret"] == runs[1]["secret"]
        for name, value in (("api_key", runs[0]["api_key"]), ("secret_key", runs[0]["secret"])):
            assert (data / name).read_text().strip() == value
            assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def test_dev_finding_the_demo_workspace_prints_a_command_that_makes_a_key(
    settings: Settings, services: Services, redis: Any, tmp_path: Path
) -> None:
    name = f"refstream_devwarm_{secrets.token_hex(4)}"
    db = with_database(services.postgres_url, name)
    env = env_for(settings, DATABASE_URL=db, REFSTREAM_LOG_FLUSH_MS="0")
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if p and p != str(Path(REFSTREAM).parent))
    errors = tmp_path / "dev.err"
    try:
        printed = []
        for _ in range(2):
            dev = start_dev(dev_ports(), env, errors)
            try:
                printed.append(await read_banner(dev, errors))
            finally:
                await stop_dev(dev)
        assert after(printed[0], "demo workspace API key (scope *, shown once):").startswith("rs_live_")
        assert not any("API key (scope" in line for line in printed[1]), printed[1]
        make = next(line.strip() for line in printed[1] if " keys create --workspace " in line)
        made = subprocess.run(["bash", "-c", make + " --json"], capture_output=True, env=env, timeout=60)
        assert made.returncode == 0, made.stderr.decode()
        key = orjson.loads(made.stdout)
        assert key["api_key"].startswith("rs_live_") and key["scopes"] == ["read", "track", "write"], key
    finally:
        await drop_database(services.postgres_url, name)


@pytest.mark.parametrize("level", ["info", "debug"])
async def test_arq_job_lines_are_debug_lines(procs: Procs, redis: Any, keys: Keys, level: str) -> None:
    worker = procs.start("work", REFSTREAM_LOG_FLUSH_MS="0", REFSTREAM_LOG_LEVEL=level)

    async def cron_ran() -> bool:
        assert worker.poll() is None, procs.logs()
        return bool(await redis.exists(keys.links_warm))  # refresh_links, arq's cron job at startup

    await wait_for(cron_ran, what="arq's startup cron job")
    await asyncio.sleep(0.5)  # its end line
    procs.stop_all()
    lines = [orjson.loads(line) for line in procs.logs().splitlines() if line.startswith("{")]
    arq = [line for line in lines if str(line.get("logger", "")).startswith("arq.")]
    if level == "debug":
        assert any("cron:refresh_links" in line["event"] for line in arq), arq
        assert {line["level"] for line in arq} == {"debug"}, arq
    else:
        assert arq == [], arq
        assert any(line["event"] == "consumer.start" for line in lines)  # the worker's own lines stay


def test_free_ports_come_from_below_the_kernels_ephemeral_range() -> None:
    # a port from the ephemeral range can be handed to some client's outgoing connection
    # before the server binds it (CI once saw an edge refuse to start so)
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1
    for port in ports:
        assert 10_000 <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # nothing holds it
