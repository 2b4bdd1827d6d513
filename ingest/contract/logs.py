"""structlog, configured once at the entrypoint.

One JSON line per batch (worker); on the edge one access line per request as
``REFSTREAM_ACCESS_LOG`` chooses (``AccessLog``: by default every 4xx and 5xx and a small
sample of the rest; metrics count every request whatever it says). The request's id, and
the event it accepted, go on every line logged while it runs (``RequestLog``, one
contextvar set per request, read only when a line is written); other ids are bound
through structlog's contextvars. Libraries that log through the standard library (arq,
aiohttp, asyncio) get the same JSON lines on the same stream.

Long-running processes (``serve``, ``work``) may buffer their lines (``REFSTREAM_LOG_FLUSH_MS``):
under load a write(2) per request line costs the edge as much as parsing the request
does, so lines are gathered and written together every few hundred milliseconds (or at
64 KiB, and at exit), as nginx's buffered access log does. A SIGKILLed process loses at
most that window of lines. 0 writes every line as it is logged.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import random
import re
import sys
import threading
import time
import traceback
from collections.abc import MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog

from ingest.contract import clock

_LEVEL_NAMES = {"warn": "warning", "exception": "error"}
_second: tuple[int, str] = (0, "")


def error_fields(exc: BaseException) -> dict[str, Any]:
    """An error as a log line may say it: its kind, its SQLSTATE, and the frames it was
    raised through (file, line, function), never its message. A database error's message
    quotes the value it refused, and a value may be a person's id, email or address; no
    log line holds one (docs/privacy.md)."""
    frames = traceback.extract_tb(exc.__traceback__)[-_FRAMES:]
    out: dict[str, Any] = {
        "error": type(exc).__name__,
        "at": [f"{'/'.join(f.filename.rsplit('/', 2)[-2:])}:{f.lineno}:{f.name}" for f in frames],
    }
    if sqlstate := getattr(exc, "sqlstate", None):
        out["sqlstate"] = sqlstate
    if exc.__cause__ is not None:
        out["cause"] = type(exc.__cause__).__name__
    return out


_FRAMES = 12
_CODE = re.compile(r"[A-Z][A-Z_]{1,23}")  # a Redis error reply's first word: OOM, MOVED, READONLY


def said(exc: BaseException) -> str:
    """An error in a log line's field: its kind, and the code a server answered with (a
    SQLSTATE, a Redis reply's first word, an errno's name), never its message. redis-py's
    message of a pipelined command's error quotes the command with its arguments
    ("Command # 2 (XADD ... 203.0.113.9 ...) of pipeline caused error: OOM ..."), as
    Postgres's quotes the value it refused and Redis's "unknown command" its first
    arguments: any of them may be a person's id, email or address (docs/privacy.md)."""
    kind = type(exc).__name__
    code = getattr(exc, "sqlstate", None)
    if code is None and isinstance(getattr(exc, "errno", None), int):
        code = errno.errorcode.get(exc.errno)  # type: ignore[attr-defined]
    if code is None and exc.args and isinstance(exc.args[0], str):
        # redis-py quotes the reply as it is, or its error's args: "... caused error: ('OOM ...',)"
        reply = exc.args[0].rsplit(" of pipeline caused error: ", 1)[-1].lstrip("('\"")
        word = _CODE.match(reply)
        if word is not None and (len(reply) == word.end() or reply[word.end()] == " "):
            code = word.group()
    return f"{kind} {code}" if code else kind


def _errors_said(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Every error a line was given, said by ``said`` (a field's value) or by
    ``error_fields`` (``exc_info``, ``log.exception``'s): no line carries an error's message
    or a traceback's."""
    info = event.pop("exc_info", None)
    if info:
        exc = info if isinstance(info, BaseException) else sys.exc_info()[1] if info is True else info[1]
        if exc is not None:
            for key, value in error_fields(exc).items():
                event.setdefault(key, value)
    for key, value in event.items():
        if isinstance(value, BaseException):
            event[key] = said(value)
    return event


def _level_and_time(_: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog's add_log_level and TimeStamper(fmt="iso", utc=True) in one step, the
    date part formatted once a second: the edge logs a line per request."""
    global _second
    now = clock.now()
    whole = int(now)
    if whole != _second[0]:
        _second = (whole, datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    event["level"] = _LEVEL_NAMES.get(method, method)
    event["timestamp"] = f"{_second[1]}.{int((now - whole) * 1_000_000):06d}Z"
    return event


class RequestLog:
    """What every line logged while a request runs says about it: its id and, once
    appended, its event's id. Set as the current request once per request (one
    ``ContextVar.set``, no structlog binding); turned into fields only when a line is written."""

    __slots__ = ("event_id", "request_id")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.event_id: object = None


CURRENT_REQUEST: ContextVar[RequestLog | None] = ContextVar("refstream_request", default=None)


def note_event(event_id: object) -> None:
    """The running request (if any) accepted this event: its lines name it from now on."""
    current = CURRENT_REQUEST.get()
    if current is not None:
        current.event_id = event_id


def _merge_request(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    current = CURRENT_REQUEST.get()
    if current is not None:
        event.setdefault("request_id", current.request_id)
        if current.event_id is not None:
            event.setdefault("event_id", str(current.event_id))
    return event


@dataclass(frozen=True, slots=True)
class AccessLog:
    """Which answered requests get an access line (``REFSTREAM_ACCESS_LOG``):

    - ``errors``: every 4xx and 5xx;
    - ``sample:<ratio>``: those, and that fraction (0 to 1) of the others, drawn at random;
    - ``all``: every request.

    A line costs the edge about as much as aiohttp's whole handling of a request, so the
    default is ``sample:0.01``; the metrics count every request either way."""

    ratio: float  # of the requests answered below 400; 1.0 is ``all``

    @classmethod
    def parse(cls, spec: str) -> AccessLog:
        text = spec.strip().lower()
        if text == "errors":
            return cls(0.0)
        if text == "all":
            return cls(1.0)
        if text.startswith("sample:"):
            try:
                ratio = float(text[len("sample:") :])
            except ValueError:
                ratio = -1.0
            if 0.0 <= ratio <= 1.0:
                return cls(ratio)
        raise ValueError(f"access log {spec!r}: errors, sample:<ratio between 0 and 1> or all")

    def wants(self, status: int) -> bool:
        return status >= 400 or self.ratio >= 1.0 or (self.ratio > 0.0 and random.random() < self.ratio)


DEFAULT_ACCESS_LOG = AccessLog.parse("sample:0.01")

_SHARED: list[structlog.types.Processor] = [
    structlog.contextvars.merge_contextvars,
    _merge_request,
    _level_and_time,
    _errors_said,
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
        self._start()
        atexit.register(self.flush_now)
        os.register_at_fork(after_in_child=self._after_fork)

    def _start(self) -> None:
        threading.Thread(target=self._run, name="log-flusher", daemon=True).start()

    def _after_fork(self) -> None:
        # the parent writes what it had buffered; the child has no flusher thread yet
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._start()

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
            for chunk in _chunks(data):
                if not self._write_all(chunk):
                    return

    def _write_all(self, chunk: bytes) -> bool:
        view = memoryview(chunk)
        while view:
            try:
                view = view[os.write(self._fd, view) :]
            except InterruptedError:
                continue
            except OSError:
                return False  # stderr closed (a pipe with no reader): nowhere to log to
        return True

    def _run(self) -> None:
        while True:
            time.sleep(self._every)
            self.flush_now()


PIPE_BUF = 4096  # Linux: a write of at most this many bytes to a pipe is never interleaved


def _chunks(data: bytes) -> list[bytes]:
    """``data`` cut at line ends into writes of at most PIPE_BUF bytes where the lines
    allow: processes that share one stderr pipe (``refstream dev``) never split each
    other's lines. A single longer line goes alone."""
    if len(data) <= PIPE_BUF:
        return [data] if data else []
    out: list[bytes] = []
    start = 0
    while start < len(data):
        end = start + PIPE_BUF
        if end >= len(data):
            out.append(data[start:])
            break
        cut = data.rfind(b"\n", start, end)
        if cut < 0:  # one line longer than PIPE_BUF: up to its own end
            cut = data.find(b"\n", end)
            if cut < 0:
                out.append(data[start:])
                break
        out.append(data[start : cut + 1])
        start = cut + 1
    return out


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


def _flush_before_tracebacks(lines: BufferedLines) -> None:
    """An uncaught exception's traceback goes straight to stderr: the buffered lines that
    led up to it go first."""
    hook = sys.excepthook

    def excepthook(*args: Any) -> None:
        lines.flush_now()
        hook(*args)

    sys.excepthook = excepthook


# arq logs every job it runs, its cron jobs' included (every few seconds in a quiet worker),
# and its start and stop, at info: in refstream's logs these are debug lines. The worker's
# own lines (consumer.start, batches, outages) say what happens; arq's warnings and errors
# (a failed job) keep their level.
_CHATTY = frozenset({"arq.worker", "arq.jobs"})


class _Demote(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and record.name in _CHATTY:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return self.level <= logging.DEBUG
        return True


class _Private(logging.Filter):
    """aiohttp's server logs a request it cannot read (a bad header, a bad request line) with
    the client's address and the parser's message, which quotes the bytes it refused (a path,
    a header): such a line keeps its kind only, as every line of ours does (``error_fields``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, BaseException) for a in record.args):
            # a library's "%s failed: %s" with the error (arq's failed job): its kind alone
            record.args = tuple(said(a) if isinstance(a, BaseException) else a for a in record.args)
        if record.name.startswith("aiohttp."):
            exc = record.exc_info[1] if record.exc_info else None
            if record.args or exc is not None:
                what = str(record.msg).split(" from ", 1)[0]  # "Error handling request from %s"
                record.msg = f"{what}: {type(exc).__name__}" if exc is not None else what
                record.args = ()
                record.exc_info = None
                record.exc_text = None
        return True


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
        lines = BufferedLines(sys.stderr.fileno(), every_s=flush_ms / 1000)
        stream = _Text(lines)
        _flush_before_tracebacks(lines)
    structlog.configure(
        processors=[*_SHARED, renderer],
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
    handler.addFilter(_Demote(lvl))
    handler.addFilter(_Private())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
