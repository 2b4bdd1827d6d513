"""Every lookup of the erasure ledger names its workspace (docs/privacy.md, *Between
workspaces*): an ``erased_ids`` entry is one workspace's, so every statement
that reads it, writes it, or probes a digest against it says in which workspace, and
another workspace's visitor of the same client-chosen id is someone else, in its rows, its
stream entries and its idempotency answers alike.

``test_every_query_of_the_ledger_names_its_workspace`` reads the code itself: every SQL text
in ``ingest/``, ``workers/`` and ``refstream/`` that touches ``erased_ids``, or looks an
erasure up by its digest (``erasures.subject``), must hold a workspace condition for each
time it names the table."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ingest.contract import erasure as ledger
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings

from ._world import World, call, make_world
from .test_erasure_tenants import _erase, _history, _import, _sweep

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("ingest", "workers", "refstream")

# a statement's use of the ledger's table, and of an erasure by its digest
_TABLE = re.compile(r"\b(FROM|JOIN|INTO|UPDATE)\s+erased_ids\b", re.IGNORECASE)
_SUBJECT = re.compile(r"\bsubject\s*=", re.IGNORECASE)
# a workspace condition: a comparison, a pair compared, or (an INSERT) a column it fills
_NAMES_WORKSPACE = re.compile(r"(\w+\.)?workspace_id\s*(=|IN\b)|=\s*(\w+\.)?workspace_id\b", re.IGNORECASE)


def _texts(tree: ast.AST) -> list[tuple[int, str]]:
    """Each string literal of a module, an f-string's pieces joined (its holes as ``?``)."""
    out: list[tuple[int, str]] = []
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            parts = []
            for v in node.values:
                inside.add(id(v))
                parts.append(v.value if isinstance(v, ast.Constant) and isinstance(v.value, str) else "?")
            out.append((node.lineno, "".join(parts)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in inside:
            out.append((node.lineno, node.value))
    return sorted(out)


def _statements(text: str) -> list[str]:
    """The pieces of ``text`` that each name the ledger once: from one use of the table to
    the end of its (sub-)select, the parenthesis that closes it (a statement reading it
    twice, in two sub-selects, must name the workspace in each)."""
    out = []
    for m in _TABLE.finditer(text):
        depth, end = 0, len(text)
        for i in range(m.start(), len(text)):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth < 0:
                end = i
                break
        out.append(text[m.start() : end])
    return out


def ledger_queries() -> list[tuple[str, str]]:
    """(where, the statement's text) of every use of the ledger in the code."""
    found = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for line, text in _texts(tree):
                where = f"{path.relative_to(ROOT)}:{line}"
                for piece in _statements(text):
                    found.append((where, piece))
                if re.search(r"\bFROM\s+erasures\b", text, re.IGNORECASE) and _SUBJECT.search(text):
                    found.append((where, text))
    return found


def _insert_names_workspace(piece: str) -> bool:
    head = re.match(r"INTO\s+erased_ids\s*\(([^)]*)\)", piece, re.IGNORECASE)
    return head is not None and "workspace_id" in head.group(1)


def test_every_query_of_the_ledger_names_its_workspace() -> None:
    """Every statement of ``ingest/``, ``workers/`` and ``refstream/`` that reads or writes the
    ledger's entries, or finds an erasure by its digest, names the workspace it asks in."""
    queries = ledger_queries()
    assert len(queries) >= 8, queries  # the scan finds them: the test can fail
    unnamed = [
        f"{where}: {' '.join(piece.split())[:160]}"
        for where, piece in queries
        if not (_NAMES_WORKSPACE.search(piece) or _insert_names_workspace(piece))
    ]
    assert unnamed == [], "a ledger lookup without its workspace:\n" + "\n".join(unnamed)


def test_the_scan_finds_a_lookup_without_its_workspace() -> None:
    """The check itself: a probe by digest alone is found, one in a workspace is not."""
    tree = ast.parse(
        'A = "SELECT digest FROM erased_ids WHERE digest = ANY($1::bytea[])"\n'
        'B = f"SELECT digest FROM erased_ids WHERE digest = ANY($1) AND workspace_id = {x}"\n'
    )
    pieces = [p for _, t in _texts(tree) for p in _statements(t)]
    assert [bool(_NAMES_WORKSPACE.search(p)) for p in pieces] == [False, True]


@pytest.fixture
async def other(pg: asyncpg.Pool, redis: Any, keys: Keys) -> World:
    return await make_world(pg, redis, keys, code="OTHERWS", name="Other")


async def _affixo(edge: str, w: World, visitor: str) -> tuple[int, Any, dict[str, str]]:
    body = {"ref": w.link["code"], "visitor_id": visitor, "url": "https://yoursite.com/"}
    headers = {"Authorization": f"Bearer {w.api_key}", "Idempotency-Key": "b-click-1"}
    return await call("POST", f"{edge}/v1/track/click", json=body, headers=headers)


async def _batch(edge: str, w: World, visitor: str) -> tuple[int, Any, dict[str, str]]:
    items = [{"type": "click", "ref": w.link["code"], "visitor_id": visitor, "idempotency_key": "b-item-1"}]
    status, out, headers = await call(
        "POST", f"{edge}/v1/events/batch", json=items, headers={"Authorization": f"Bearer {w.api_key}"}
    )
    return status, out["results"][0] if status == 200 else out, headers


@pytest.mark.parametrize("door", [_affixo, _batch], ids=["affixo", "batch"])
async def test_another_workspaces_answer_naming_the_same_visitor_id_is_left_as_it_was(
    door: Any,
    edge: str,
    world: World,
    other: World,
    settings: Settings,
    pg: asyncpg.Pool,
    redis: Any,
    keys: Keys,
    drain: Any,
    tmp_path: Path,
) -> None:
    """Issue 64's first finding: A's click under ``vis_shared`` gets alice's lead, alice is
    erased. B's client sent a keyed click (Affixo's, a batch item) under the same visitor id:
    after the sweep, a repeat of B's key is answered as it first was (``vis_shared``, never
    A's pseudonym of it)."""
    shared = "vis_shared"
    await _import(settings, tmp_path, world, _history(world.link["code"], "alice", "alice@a.example", shared))
    status, first, _ = await door(edge, other, shared)
    assert status == 200 and first["visitor_id"] == shared, first
    await drain()
    await _erase(edge, pg, redis, keys, world, "alice")
    await _sweep(pg, redis, keys)
    # A's alice is gone (the erasure reached the visitor in A)
    held = await pg.fetchval(
        "SELECT count(*) FROM events WHERE workspace_id = $1 AND visitor_id = $2", world.workspace_id, shared
    )
    assert held == 0
    status, again, _ = await door(edge, other, shared)
    assert status == 200 and again == first, (status, again)
    assert not ledger.is_pseudonym(again["visitor_id"])
