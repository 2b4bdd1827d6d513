"""A small WebDriver BiDi client, enough to drive a stock Firefox in a test.

Playwright drives only its own patched Firefox, which cannot be had where only package
registries answer; Debian's firefox-esr speaks W3C WebDriver BiDi itself (a WebSocket at
``/session`` when started with ``--remote-debugging-port``). This module starts one such
Firefox on a throwaway profile (:func:`firefox`), opens a session over aiohttp's WebSocket
client (:class:`BiDi`), and offers the few commands a test needs on a tab (:class:`Tab`):
navigate, evaluate, call a function, screenshot. Events (``log.entryAdded``,
``browsingContext.userPromptOpened``) go to the callbacks registered with :meth:`BiDi.on`.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from .conftest import wait_for

Event = dict[str, Any]

# A profile that starts straight to its page: no first-run or what's-new page, no default
# browser question, and nothing fetched in the background that a test did not ask for.
PREFS = {
    "remote.active-protocols": 1,  # WebDriver BiDi only (no CDP)
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "browser.startup.page": 0,
    "startup.homepage_welcome_url": "about:blank",
    "browser.aboutwelcome.enabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "app.update.disabledForTesting": True,
    "app.normandy.enabled": False,
    "messaging-system.rsexperimentloader.enabled": False,
    "browser.safebrowsing.update.enabled": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
}
LISTENING = re.compile(r"WebDriver BiDi listening on (ws://\S+)")


class BiDiError(Exception):
    """A command the browser answered with an error."""


class ScriptError(Exception):
    """A script that threw in the page: its message, as the page's console would show it."""


class BiDi:
    """One WebDriver BiDi session over one WebSocket: commands are matched to their answers
    by id, events go to the callbacks registered for their method."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._listeners: dict[str, list[Callable[[Event], None]]] = {}
        self._reader = asyncio.create_task(self._read())

    async def command(self, method: str, params: dict[str, Any] | None = None, *, timeout: float = 60) -> Any:
        """``method`` with ``params``: its result, or :class:`BiDiError` with the browser's
        reason."""
        ident = next(self._ids)
        answer = asyncio.get_running_loop().create_future()
        self._waiting[ident] = answer
        try:
            await self._ws.send_str(orjson.dumps({"id": ident, "method": method, "params": params or {}}).decode())
            return await asyncio.wait_for(answer, timeout)
        finally:
            self._waiting.pop(ident, None)

    def on(self, method: str, callback: Callable[[Event], None]) -> None:
        """Call ``callback`` with each event ``method``'s params (subscribe to it as well)."""
        self._listeners.setdefault(method, []).append(callback)

    async def subscribe(self, *methods: str) -> None:
        await self.command("session.subscribe", {"events": list(methods)})

    async def tab(self) -> Tab:
        """A new tab, of this session's window."""
        created = await self.command("browsingContext.create", {"type": "tab"})
        return Tab(self, created["context"])

    async def close(self) -> None:
        with suppress(BiDiError, asyncio.TimeoutError, ConnectionError):
            await self.command("session.end", timeout=5)
        await self._ws.close()
        self._reader.cancel()
        with suppress(asyncio.CancelledError):
            await self._reader

    async def _read(self) -> None:
        try:
            async for message in self._ws:
                if message.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    self._dispatch(orjson.loads(message.data))
        finally:
            for answer in self._waiting.values():
                if not answer.done():
                    answer.set_exception(ConnectionError("the browser closed its WebDriver BiDi socket"))

    def _dispatch(self, message: dict[str, Any]) -> None:
        if message.get("type") == "event":
            for callback in self._listeners.get(message["method"], []):
                callback(message["params"])
            return
        answer = self._waiting.get(message.get("id", -1))
        if answer is None or answer.done():
            return
        if message.get("type") == "error":
            answer.set_exception(BiDiError(f"{message.get('error')}: {message.get('message')}"))
        else:
            answer.set_result(message.get("result"))


class Tab:
    """One browsing context (a tab) of a :class:`BiDi` session."""

    def __init__(self, bidi: BiDi, context: str) -> None:
        self.bidi = bidi
        self.context = context

    async def goto(self, url: str) -> None:
        """``url``, returning once the page has loaded (its ``load`` event)."""
        await self.bidi.command("browsingContext.navigate", {"context": self.context, "url": url, "wait": "complete"})

    async def set_viewport(self, width: int, height: int) -> None:
        viewport = {"width": width, "height": height}
        await self.bidi.command("browsingContext.setViewport", {"context": self.context, "viewport": viewport})

    async def evaluate(self, expression: str) -> Any:
        """``expression``'s value in the page, a promise's awaited (as JSON-like Python)."""
        result = await self.bidi.command(
            "script.evaluate",
            {"expression": expression, "target": {"context": self.context}, "awaitPromise": True},
        )
        return _returned(result)

    async def call(self, function: str, *args: Any) -> Any:
        """``function`` (its source) called in the page with ``args``: its value, as
        :meth:`evaluate`."""
        result = await self.bidi.command(
            "script.callFunction",
            {
                "functionDeclaration": function,
                "arguments": [_local(a) for a in args],
                "target": {"context": self.context},
                "awaitPromise": True,
            },
        )
        return _returned(result)

    async def screenshot(self, path: Path) -> None:
        """The viewport as a PNG at ``path``."""
        shot = await self.bidi.command("browsingContext.captureScreenshot", {"context": self.context})
        path.write_bytes(base64.b64decode(shot["data"]))


def _returned(result: dict[str, Any]) -> Any:
    if result["type"] == "exception":
        details = result["exceptionDetails"]
        raise ScriptError(f"{details.get('text')} (line {details.get('lineNumber')})")
    return _python(result["result"])


def _python(remote: dict[str, Any]) -> Any:
    """A BiDi remote value as Python: primitives, arrays and plain objects; anything else
    (a node, a function) as BiDi describes it."""
    kind, value = remote["type"], remote.get("value")
    if kind in ("undefined", "null"):
        return None
    if kind in ("string", "boolean"):
        return value
    if kind == "number":
        return float(value.replace("Infinity", "inf")) if isinstance(value, str) else value
    if kind in ("array", "set"):
        return [_python(v) for v in value or []]
    if kind in ("object", "map"):
        return {k if isinstance(k, str) else _python(k): _python(v) for k, v in value or []}
    return remote


def _local(value: Any) -> dict[str, Any]:
    """A Python argument as a BiDi local value."""
    if value is None:
        return {"type": "null"}
    if isinstance(value, bool):
        return {"type": "boolean", "value": value}
    if isinstance(value, int | float):
        return {"type": "number", "value": value}
    if isinstance(value, str):
        return {"type": "string", "value": value}
    if isinstance(value, list | tuple):
        return {"type": "array", "value": [_local(v) for v in value]}
    if isinstance(value, dict):
        return {"type": "object", "value": [[str(k), _local(v)] for k, v in value.items()]}
    raise TypeError(f"no BiDi value for {type(value).__name__}")


@asynccontextmanager
async def firefox(executable: str, *, within_s: float = 60) -> AsyncIterator[BiDi]:
    """A headless Firefox on a profile of its own, and a BiDi session with it. Afterwards its
    process group (started by this process, found by its pid) is killed and the profile
    removed."""
    home = Path(tempfile.mkdtemp(prefix="refstream-firefox-"))
    profile = home / "profile"
    profile.mkdir()
    (profile / "user.js").write_text(
        "".join(f"user_pref({orjson.dumps(k).decode()}, {orjson.dumps(v).decode()});\n" for k, v in PREFS.items())
    )
    log_path = home / "firefox.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                executable,
                "--headless",
                "--no-remote",
                "--profile",
                str(profile),
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "MOZ_CRASHREPORTER_DISABLE": "1"},
            start_new_session=True,  # its content processes share its group: one kill ends them all
        )
    try:
        url = await wait_for(
            lambda: _listening(proc, log_path), timeout=within_s, what="Firefox's WebDriver BiDi socket"
        )
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{url}/session", max_msg_size=0) as ws:
            bidi = BiDi(ws)
            try:
                await bidi.command(
                    "session.new",
                    {"capabilities": {"alwaysMatch": {"unhandledPromptBehavior": {"default": "dismiss"}}}},
                )
                yield bidi
            finally:
                await bidi.close()
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 30)
        shutil.rmtree(home, ignore_errors=True)


async def _listening(proc: subprocess.Popen[bytes], log_path: Path) -> str | None:
    """The socket's URL once Firefox has printed it; fails at once if Firefox has exited."""
    log = log_path.read_text(errors="replace")
    if proc.poll() is not None:
        raise AssertionError(f"Firefox exited with {proc.returncode}: {log[-3000:]}")
    found = LISTENING.search(log)
    return found.group(1) if found else None
