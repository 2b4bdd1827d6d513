"""structlog, configured once at the entrypoint.

One JSON line per request (edge) or batch (worker); ids are bound through contextvars.
Libraries that log through the standard library (arq, aiohttp, asyncio) get the same JSON
lines on the same stream.

Long-running processes (``serve``, ``work``) may buffer their lines (``REFSTREAM_LOG_FLUSH_MS``):
under load a write(2) per request line costs the edge as much as parsing the request
does, so lines are gathered and written together every few hundred milliseconds (or at
64 KiB, and at exit), as nginx's buffered access log does. A SIGKILLed process loses at
most that window of lines. 0 writes every line as it is logged.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from typing import Any

import orjson
import structlog

_SHARED: list[structlog.types.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def _dumps(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


class BufferedLines:
    """A write-only byte stream onto a file descriptor, written at most every ``every_s``
    (or when ``max_bytes`` are waiting), by a daemon thread, and at interpreter exit.
    ``flush()`` does nothing: the callers that flush after every line (structlog's loggers,
    logging's StreamHandler) are exactly the writes this exists to gather."""

    def __init__(self, fd: int, *, every_s: float, max_bytes: int = 64 * 1024) -> None:
        self._fd = fd
        self._every = every_s
        self._max = max_bytes
        self._buf = bytearray()
        self._lock = threading.Lock()  # the buffer
        self._write_lock = threading.Lock()  # the fd: one writer at a time, in order
        threading.Thread(target=self._run, name="log-flusher", daemon=True).start()
        atexit.register(self.flush_now)

    def write(self, data: bytes) -> int:
        with self._lock:
            self._buf += data
            full = len(self._buf) >= self._max
        if full:
            self.flush_now()
        return len(data)

    def flush(self) -> None:
        return None

    def flush_now(self) -> None:
        with self._write_lock:
            with self._lock:
                data = bytes(self._buf)
                self._buf.clear()
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(self._fd, view) :]
                except InterruptedError:
                    continue
                except OSError:
                    return  # stderr closed (a pipe with no reader): nowhere to log to

    def _run(self) -> None:
        while True:
            time.sleep(self._every)
            self.flush_now()


class _Text:
    """str on top of a byte stream, for the text-writing loggers (print, StreamHandler)."""

    def __init__(self, out: BufferedLines) -> None:
        self._out = out

    def write(self, text: str) -> int:
        self._out.write(text.encode("utf-8", "replace"))
        return len(text)

    def flush(self) -> None:
        return None


class _LineLogger:
    """structlog's PrintLogger without print(): one write per line."""

    def __init__(self, out: Any) -> None:
        self._out = out

    def msg(self, message: str) -> None:
        self._out.write(message + "\n")
        self._out.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = failure = err = msg


def configure_logging(level: str = "info", *, json: bool = True, flush_ms: int = 0) -> None:
    """``flush_ms`` > 0 buffers lines for that long (long-running processes only)."""
    lvl = logging.getLevelName(level.upper())
    if not isinstance(lvl, int):
        lvl = logging.INFO
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer(serializer=_dumps) if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    stream: Any = sys.stderr
    if flush_ms > 0:
        sys.stderr.flush()
        stream = _Text(BufferedLines(sys.stderr.fileno(), every_s=flush_ms / 1000))
    structlog.configure(
        processors=[*_SHARED, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=lambda *_: _LineLogger(stream),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *_SHARED],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
