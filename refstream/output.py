"""How the operator commands print: one convention for every command that prints data.

A rich table for people by default; ``--json`` for scripts (the same data, complete, on
one JSON document). Data goes to stdout; progress bars and diagnostics to stderr. Cells
are never read as rich markup and control characters are escaped, because what they show
(dead letters, error texts, User-Agents) came from outside.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
import orjson
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ingest.contract.keys import Keys

F = TypeVar("F", bound=Callable[..., Any])
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


JSON_META = "refstream.json"  # in click's ctx.meta: --json was given


def json_option(fn: F) -> F:
    """The ``--json`` flag every data-printing command takes; ``wants_json()`` reads it."""

    def remember(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
        ctx.meta[JSON_META] = value
        return value

    return click.option(
        "--json", is_flag=True, expose_value=False, callback=remember, help="Print JSON instead of a table."
    )(fn)


def wants_json() -> bool:
    """The running command was given ``--json``."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(JSON_META))


def print_json(data: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
    sys.stdout.flush()


def console() -> Console:
    """stdout, as wide as the terminal (or ``COLUMNS``); 80 when it cannot tell."""
    return Console()


def cell(value: Any) -> Text:
    """A table cell from data: ``-`` for None, never markup, control characters escaped."""
    if value is None:
        return Text("-")
    text = value if isinstance(value, str) else str(value)
    return Text(_CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", text))


# ids are copied into the next command: they keep their width while the text columns wrap
_WHOLE = frozenset({"p", "dead id", "entry id", "last delivered"})


def table(title: str, *columns: str, left: tuple[str, ...] = ()) -> Table:
    """A table titled ``title``; numbers right-aligned, the ``left`` columns left. A value
    too long for its column folds onto the next line, never cut short with an ellipsis:
    a consumer name, a stream id or an error is no use without its end."""
    t = Table(title=title, title_justify="left", title_style="bold")
    for c in columns:
        t.add_column(c, justify="left" if c in left else "right", overflow="fold", no_wrap=c in _WHOLE)
    return t


def partition(keys: Keys, stream: str | None) -> str:
    """A stream key as its partition number, the way the tables show it (the key itself
    when it is not one of this configuration's partitions: the count changed since)."""
    if stream is None:
        return "-"
    try:
        return str(keys.streams.index(stream))
    except ValueError:
        return stream


def streams_line(keys: Keys) -> Text:
    """Where the partition numbers (``p``) of a table point, said once above it."""
    return Text.assemble(("p", "bold"), " is the partition: stream ", keys.stream(0).replace("{0}", "{p}"))
