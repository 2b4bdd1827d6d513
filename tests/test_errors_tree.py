"""The error tree decides (``ingest/contract/errors.py``): every error class sits on exactly
one branch, and above the edge's link to Redis (``ingest/link``) nobody catches, raises or
tests for a redis-py error class: the link translates them into the tree
(``ingest/link/errors.py``), so the edge and the spool decide by branch."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest
import redis.exceptions
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ConnectionError,
    DataError,
    MovedError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    TimeoutError,
)

from ingest.contract import errors
from ingest.contract.errors import NotSent, OutcomeUnknown, RefstreamError, Unknown
from ingest.link.errors import Rejected, replies, translated

ROOT = Path(__file__).resolve().parent.parent
BRANCHES = (errors.NotSent, errors.OutcomeUnknown, errors.Outage, errors.Refused, errors.Misconfigured)
# the rooms above the link: they reach Redis through it (the batcher, the spool's drain) and
# see only the tree. The workers, the management API, the contract and the command line hold
# redis-py clients of their own, and catch what those raise.
ABOVE_THE_LINK = ("ingest/edge", "ingest/spool", "ingest/host")
# names that stand for redis-py's exception classes without naming one
ALIASES = {"REDIS_ERRORS"}


def _error_classes() -> list[tuple[str, type[BaseException]]]:
    found: list[tuple[str, type[BaseException]]] = []
    for top in ("ingest", "workers", "refstream"):
        for f in sorted((ROOT / top).rglob("*.py")):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            module = importlib.import_module(name)
            for cls_name, cls in inspect.getmembers(module, inspect.isclass):
                if cls.__module__ == name and issubclass(cls, BaseException):
                    found.append((f"{name}.{cls_name}", cls))
    return found


def test_every_error_class_sits_on_exactly_one_branch() -> None:
    classes = _error_classes()
    assert len(classes) > 40  # the scan found the project's errors
    wrong: list[str] = []
    for name, cls in classes:
        if cls is RefstreamError or cls in BRANCHES:
            continue
        on = [b.__name__ for b in BRANCHES if issubclass(cls, b)]
        if len(on) != 1:
            wrong.append(f"{name}: {on or 'no branch'}")
    assert wrong == [], "each error says one thing to do next"


def test_outcome_unknown_is_one_class_with_a_reason() -> None:
    """ "Outcome unknown" is spelled once: the branch itself, its ``reason`` saying which way."""
    leaves = [name for name, cls in _error_classes() if issubclass(cls, OutcomeUnknown) and cls is not OutcomeUnknown]
    assert leaves == []
    unknown = OutcomeUnknown("lost", Unknown.LOST)
    assert unknown.reason is Unknown.LOST and not unknown.answered_unknown
    assert OutcomeUnknown("a commit", Unknown.COMMIT).answered_unknown
    mine = unknown.for_request([b"1-0"])
    assert mine.reason is Unknown.LOST and mine.replies == [b"1-0"] and str(mine) == "lost"


def _redis_exception_names(tree: ast.Module) -> set[str]:
    """Local names bound to redis-py's exception classes, or to a redis module."""
    names = set(ALIASES)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "redis":
            for a in node.names:
                obj = getattr(importlib.import_module(node.module), a.name, None)
                if inspect.ismodule(obj) or (inspect.isclass(obj) and issubclass(obj, BaseException)):
                    names.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "redis":
                    names.add(a.asname or a.name.split(".")[0])
    return names


def _mentions(node: ast.AST | None, names: set[str]) -> list[str]:
    """The redis-py names ``node`` (an except clause's type, a raised call, an isinstance's
    classes) refers to: a bare name, or an attribute of a redis module (``aioredis.ResponseError``),
    or a starred alias (``*REDIS_ERRORS``)."""
    if node is None:
        return []
    if isinstance(node, ast.Name):
        return [node.id] if node.id in names else []
    if isinstance(node, ast.Attribute):
        base: ast.AST = node
        while isinstance(base, ast.Attribute):
            base = base.value
        return [ast.unparse(node)] if isinstance(base, ast.Name) and base.id in names else []
    if isinstance(node, ast.Call):  # raise X(...): the class called
        return _mentions(node.func, names)
    return [hit for child in ast.iter_child_nodes(node) for hit in _mentions(child, names)]


def _caught_or_raised(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, name) of each redis-py error class an ``except`` catches, a ``raise`` raises or
    an ``isinstance`` tests for in ``tree``."""
    names = _redis_exception_names(tree)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler):
            hits = _mentions(node.type, names)
        elif isinstance(node, ast.Raise):
            hits = _mentions(node.exc, names)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
            hits = _mentions(node.args[1] if len(node.args) > 1 else None, names)
        else:
            continue
        found += [(node.lineno, h) for h in hits]
    return found


def test_no_redis_error_class_is_caught_or_raised_above_the_link() -> None:
    found: list[str] = []
    for room in ABOVE_THE_LINK:
        for path in sorted((ROOT / room).rglob("*.py")):
            where = path.relative_to(ROOT)
            found += [f"{where}:{line}: {name}" for line, name in _caught_or_raised(ast.parse(path.read_text()))]
    assert found == [], "above the link, errors are the tree's: catch a branch (ingest.link.errors translates)"


def test_no_route_passes_a_value_or_an_answer() -> None:
    """What is decided below a route is raised (``ingest.edge.problem``: ``Problem``, ``Down``)
    and rendered by its voice, never returned beside a value for the route to tell apart."""
    found: list[str] = []
    for path in sorted((ROOT / "ingest").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
                if len(node.args) == 2 and "web.Response" in ast.unparse(node.args[1]):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert found == []


def test_the_scan_sees_what_it_looks_for() -> None:
    seen = _caught_or_raised(
        ast.parse(
            "import redis.asyncio as aioredis\n"
            "from redis.exceptions import ResponseError as RE\n"
            "from redis.exceptions import RedisError\n"
            "try:\n    pass\nexcept (RE, *REDIS_ERRORS):\n    raise aioredis.ConnectionError('x')\n"
            "isinstance(x, aioredis.exceptions.TimeoutError)\n"
            "isinstance(x, (int, RedisError))\n"
        )
    )
    assert {name for _, name in seen} == {
        "RE",
        "REDIS_ERRORS",
        "aioredis.ConnectionError",
        "aioredis.exceptions.TimeoutError",
        "RedisError",
    }


@pytest.mark.parametrize(
    "raised",
    [
        ConnectionError("Connection refused"),
        TimeoutError("Timeout reading from socket"),
        AuthenticationError("invalid password"),
        BusyLoadingError("LOADING Redis is loading the dataset in memory"),
        DataError("bad argument"),
        RedisClusterException("no nodes"),
        OSError("reset by peer"),
        redis.exceptions.InvalidResponse("protocol error"),
    ],
)
def test_the_link_translates_what_redis_py_raises_into_an_unknown_outcome(raised: BaseException) -> None:
    out = translated(raised)
    assert isinstance(out, OutcomeUnknown) and out.reason is Unknown.LOST
    assert out.__cause__ is raised


@pytest.mark.parametrize(
    "reply, code",
    [
        # as redis-py makes them: the code taken off where it has a class for it
        (ResponseError("value is not an integer or out of range"), "ERR"),
        (OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), "OOM"),
        (ReadOnlyError("You can't write against a read only replica."), "READONLY"),
        (NoScriptError("No matching script. Please use EVAL."), "NOSCRIPT"),
        (ResponseError("GONE refstream:events:3"), "GONE"),
        (ResponseError("STALE refstream:events:{3}"), "STALE"),
        (ResponseError("MASTERDOWN Link with MASTER is down"), "MASTERDOWN"),
        (MovedError("3999 127.0.0.1:6381"), "MOVED"),
    ],
)
def test_the_link_hands_an_error_reply_up_as_rejected(reply: BaseException, code: str) -> None:
    (out,) = replies([reply])
    assert isinstance(out, Rejected) and isinstance(out, NotSent) and out.code == code
    assert translated(reply).__class__ is Rejected


def test_the_tree_passes_the_boundary_as_it_is() -> None:
    unknown = OutcomeUnknown("x", Unknown.REPLY)
    assert translated(unknown) is unknown
    bug = KeyError("a bug is not an outage")
    assert translated(bug) is bug
    assert replies([b"OK", None, 3]) == [b"OK", None, 3]
    (nested,) = replies([[b"a", [ResponseError("GONE s")]]])  # a script's array, its calls' errors
    assert nested[0] == b"a" and isinstance(nested[1][0], Rejected) and nested[1][0].code == "GONE"
