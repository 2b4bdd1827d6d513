"""No error's message in a log line (docs/privacy.md "Logs"): a server's error quotes what it
refused, and what it refused may be a person's. redis-py's error for a pipelined command
quotes the command with its arguments, Redis's "unknown command" its first arguments,
Postgres's "invalid input" the value. A real process gets each of these from the real
servers, with an address and an email among the arguments, and logs it every way
refstream's code and its libraries do: as a field (``error=exc``), through
``log.exception``, through the standard library with the error as an argument (arq's
failed job) or with ``exc_info``. Every line says the error's kind and the server's code
(``said``), and none holds the address or the email in any spelling.

The kind is held in the source too: no log call anywhere gives an error's text
(``repr(exc)``, ``str(exc)``) as a field, which would bypass ``said``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from ingest.contract.settings import Settings

from ._logscan import find_personal

ROOT = Path(__file__).resolve().parent.parent
ADDRESS = "203.0.113.77"
EMAIL = "carol.logged@example.com"

SCRIPT = """
import asyncio, logging, sys
import asyncpg, redis.asyncio as aioredis, structlog
from ingest.contract.logs import configure_logging

configure_logging("debug")
log = structlog.get_logger("t")
std = logging.getLogger("arq.jobs")
redis_url, database_url, key, address, email = sys.argv[1:6]

async def errors():
    r = aioredis.Redis.from_url(redis_url)
    try:
        async with r.pipeline(transaction=False) as pipe:
            pipe.set(key, "a string", ex=60)
            pipe.xadd(key, {"ip": address, "email": email})  # WRONGTYPE
            try:
                await pipe.execute()
            except Exception as exc:
                yield "pipeline", exc
        try:
            await r.execute_command("NOSUCHCOMMAND", email, address)
        except Exception as exc:
            yield "unknown", exc
        await r.delete(key)
    finally:
        await r.aclose()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.fetchval("SELECT $1::text::int", email)
    except Exception as exc:
        yield "postgres", exc
    finally:
        await conn.close()

async def main():
    async for what, exc in errors():
        assert address in str(exc) or email in str(exc), (what, str(exc))  # what a careless line would say
        log.warning("as_field", what=what, error=exc)
        try:
            raise exc
        except Exception:
            log.exception("as_exception", what=what)
        log.error("as_exc_info", what=what, exc_info=exc)
        std.error("%s failed: %s", what, exc)
        std.error("stdlib exc_info %s", what, exc_info=exc)

asyncio.run(main())
"""


def test_a_servers_error_is_logged_by_its_kind_and_code_never_its_message(settings: Settings, tmp_path: Path):
    key = f"{settings.stream_prefix}:log-errors"
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, settings.redis_url, settings.database_url, key, ADDRESS, EMAIL],
        capture_output=True,
        cwd=ROOT,
        timeout=60,
    )
    text = out.stderr.decode()
    assert out.returncode == 0, text
    lines = [orjson.loads(line) for line in text.splitlines()]
    assert find_personal(text, [ADDRESS, EMAIL]) == []
    assert "Traceback" not in text and "caused error" not in text
    by: dict[tuple[str, str], dict[str, Any]] = {}
    for line in lines:
        if "what" in line:
            by[(line["event"], line["what"])] = line
    assert {what for _, what in by} == {"pipeline", "unknown", "postgres"}, lines
    # the kind and the server's code, whichever way the error reached the line
    assert by[("as_field", "pipeline")]["error"] == "ResponseError WRONGTYPE"
    assert by[("as_field", "unknown")]["error"] == "ResponseError"  # redis-py keeps no "ERR"
    assert by[("as_field", "postgres")]["error"] == "InvalidTextRepresentationError 22P02"
    for what in ("pipeline", "unknown", "postgres"):
        for event in ("as_exception", "as_exc_info"):
            line = by[(event, what)]
            assert line["error"] in ("ResponseError", "InvalidTextRepresentationError") and line["at"], line
    stdlib = [line["event"] for line in lines if line.get("logger") == "arq.jobs"]
    assert "pipeline failed: ResponseError WRONGTYPE" in stdlib
    assert "postgres failed: InvalidTextRepresentationError 22P02" in stdlib
    assert len([e for e in stdlib if e.startswith("stdlib exc_info")]) == 3


_TEXT = {"repr", "str", "format"}


def _error_text_fields(tree: ast.AST) -> list[tuple[int, str]]:
    """Log calls that pass an exception's text as a field: ``log.warning(..., error=repr(exc))``,
    where ``exc`` is bound by an ``except ... as``."""
    bound = {h.name for h in ast.walk(tree) if isinstance(h, ast.ExceptHandler) and h.name}
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if not (isinstance(node.func.value, ast.Name) and node.func.value.id.endswith("log")):
            continue
        for value in [k.value for k in node.keywords] + list(node.args[1:]):
            inner = value.value if isinstance(value, ast.Subscript) else value  # str(exc)[:300]
            if (
                isinstance(inner, ast.Call)
                and isinstance(inner.func, ast.Name)
                and inner.func.id in _TEXT
                and inner.args
                and isinstance(inner.args[0], ast.Name)
                and inner.args[0].id in bound
            ):
                found.append((node.lineno, ast.unparse(node)[:160]))
    return found


def test_no_log_call_gives_an_errors_text():
    offenders = []
    for room in ("ingest", "workers", "refstream"):
        for path in sorted((ROOT / room).rglob("*.py")):
            for line, call in _error_text_fields(ast.parse(path.read_text(), str(path))):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {call}")
    assert offenders == [], "\n".join(offenders)


def test_the_source_check_finds_an_errors_text():
    """The check above can fail: it finds each spelling of the fault it looks for."""
    bad = """
try:
    pass
except Exception as exc:
    log.warning("x", error=repr(exc))
    log.info("y", reason=str(exc)[:300])
    self.log.debug("z", error=exc)
"""
    assert [line for line, _ in _error_text_fields(ast.parse(bad))] == [5, 6]
