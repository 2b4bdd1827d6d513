"""The rooms of ARCHITECTURE.md hold: each imports only what its row says it may, and no
module imports itself back through others (no import circles). Inside ``refstream/`` the
imports point down too: the command line on its commands, the commands on the console and
the shared modules, the console on the shared modules only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.once

ROOT = Path(__file__).resolve().parent.parent

# room -> the rooms (or single modules) it may import; ARCHITECTURE.md's "May import" column
MAY_IMPORT: dict[str, set[str]] = {
    "ingest.contract": set(),
    "ingest.link": {"ingest.contract"},
    "ingest.ledger": {"ingest.contract"},
    "ingest.privacy": {"ingest.contract"},
    "ingest.edge": {"ingest.contract", "ingest.link", "ingest.spool", "ingest.ledger", "ingest.privacy"},
    "ingest.spool": {"ingest.contract", "ingest.link"},
    "ingest.host": {
        "ingest.contract",
        "ingest.link",
        "ingest.ledger",
        "ingest.privacy",
        "ingest.edge",
        "ingest.spool",
        "ingest.manage",
    },
    "ingest.manage": {"ingest.contract", "ingest.edge", "ingest.ledger", "ingest.privacy"},
    "workers.group": {"ingest.contract"},
    "workers.consumer": {"ingest.contract", "workers.group", "ingest.ledger", "ingest.privacy"},
    "workers.archive": {"ingest.contract", "workers.group", "ingest.ledger"},
    "workers.ops": {
        "ingest.contract",
        "ingest.spool",
        "ingest.ledger",
        "ingest.privacy",
        "workers.group",
        "workers.consumer",
        "workers.archive",
    },
    "workers.host": {"ingest.contract", "workers.group", "workers.consumer", "workers.archive", "workers.ops"},
}


# refstream's floors, bottom first: a module imports ingest/, workers/ and the floors at or
# below its own, never one above (a floor is the longest of these its name starts with)
FLOORS = ("refstream", "refstream.console", "refstream.commands", "refstream.cli")


def _modules(tops: tuple[str, ...] = ("ingest", "workers")) -> dict[str, Path]:
    out = {}
    for top in tops:
        for f in (ROOT / top).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out[name] = f
    return out


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """The project's modules ``path`` imports (``from pkg import module`` as the module;
    ``from . import x`` and ``from .x import y`` resolved from ``path``'s package)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = path.relative_to(ROOT).parent.parts
    found: set[str] = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            found |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom) and (n.module or n.level):
            up = package[: len(package) - n.level + 1] if n.level else ()
            module = ".".join([*up, *([n.module] if n.module else [])])
            for a in n.names:  # ``from package import module`` imports the module (and the package's __init__ first)
                found.add(f"{module}.{a.name}" if f"{module}.{a.name}" in ALL_MODULES else module)
    return {m for m in found if m.split(".")[0] in ("ingest", "workers", "refstream")}


MODULES = _modules()
REFSTREAM = _modules(("refstream",))
ALL_MODULES = {**MODULES, **REFSTREAM}


def _floor(module: str) -> int:
    return max(i for i, f in enumerate(FLOORS) if module == f or module.startswith(f + "."))


def _room(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _allowed(src: str, dst: str) -> bool:
    if _room(src) == _room(dst):
        return True
    return any(dst == ok or dst.startswith(ok + ".") for ok in MAY_IMPORT[_room(src)])


def test_every_module_is_in_a_room() -> None:
    loose = [m for m in _modules() if m.count(".") and _room(m) not in MAY_IMPORT]
    assert loose == []


def test_each_room_imports_only_what_it_may() -> None:
    modules = MODULES
    wrong = sorted(
        (src, dst)
        for src, path in modules.items()
        if src.count(".")
        for dst in _imports(path, top_level_only=False)
        if dst in modules and dst.count(".") > 1 and not _allowed(src, dst)
    )
    assert wrong == [], "imports across rooms that ARCHITECTURE.md does not allow"
    # and nothing in ingest/ or workers/ imports the command line
    assert not [
        (s, d) for s, p in modules.items() for d in _imports(p, top_level_only=False) if d.startswith("refstream")
    ]


def test_refstream_imports_point_down() -> None:
    # the console is below the commands (``refstream console`` starts it): what both need is
    # the console's, or below it, never a command's
    assert {_floor(m) for m in REFSTREAM} == set(range(len(FLOORS)))
    up = sorted(
        (src, dst)
        for src, path in REFSTREAM.items()
        for dst in _imports(path, top_level_only=False)
        if dst in REFSTREAM and _floor(dst) > _floor(src)
    )
    assert up == [], f"imports up the floors {' < '.join(FLOORS)}"


def _project_imports(path: Path) -> list[tuple[str, str | None]]:
    """Every (module, name) ``path`` imports from the project's packages or the bench: the
    name is None for ``import module``."""
    found: list[tuple[str, str | None]] = []
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            found += [(a.name, None) for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            found += [(n.module, a.name) for a in n.names]
    return [(m, name) for m, name in found if m.split(".")[0] in ("ingest", "workers", "refstream", "bench")]


def test_the_command_line_imports_nothing_of_the_bench() -> None:
    # the bench sits on top: it runs the command line's processes, never the other way
    wrong = sorted(
        (str(f.relative_to(ROOT)), m)
        for f in (ROOT / "refstream").rglob("*.py")
        for m, _ in _project_imports(f)
        if m == "bench" or m.startswith("bench.")
    )
    assert wrong == []


def test_the_bench_imports_only_public_names() -> None:
    # a private name (``_x``) is its module's own business: the bench measures what the
    # others may call, and renaming a private helper must not break it
    wrong = sorted(
        (str(f.relative_to(ROOT)), m, name)
        for f in (ROOT / "bench").rglob("*.py")
        for m, name in _project_imports(f)
        if not m.startswith("bench")
        and any(part.startswith("_") for part in [*m.split("."), *([name] if name else [])])
    )
    assert wrong == []


def test_no_import_circles() -> None:
    modules = ALL_MODULES
    graph = {m: {d for d in _imports(p, top_level_only=True) if d in modules and d != m} for m, p in modules.items()}
    # a package's __init__ is imported with its modules: an edge to a package is an edge to it only
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                circles.append([*path[path.index(d) :], d])
            elif d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert circles == []


def test_the_room_table_names_every_room() -> None:
    table = (ROOT / "ARCHITECTURE.md").read_text()
    missing = [room for room in MAY_IMPORT if f"`{room.replace('.', '/')}/`" not in table]
    assert missing == []


def test_the_path_of_a_click_names_files_and_functions_that_exist() -> None:
    import re

    text = (ROOT / "ARCHITECTURE.md").read_text()
    path = text[text.index("## The path of one click") :]
    named = set(re.findall(r"`((?:ingest|workers)/[\w/]+\.py)`(?: `(\w+)`)?", path))
    assert len(named) > 20
    missing = [f for f, _ in named if not (ROOT / f).is_file()]
    assert missing == []
    gone = [
        (f, fn) for f, fn in named if fn and not re.search(rf"^\s*(async )?def {fn}\b", (ROOT / f).read_text(), re.M)
    ]
    assert gone == []


def test_tracking_routes_append_and_refuse_through_the_accept_pipeline() -> None:
    # issue 25: the routes repeated lookup -> refusal -> append each in its own way; now a
    # route takes the shared steps (tests/test_route_steps.py): its append is ``enqueue.put``
    # or ``keyed.put_once``, never the appends under them (``enqueue.append``,
    # ``keyed.append_keyed``), and the public link's refusals (the drops they account) are
    # ``accept.refusal``'s. The batch route alone sends its items' appends itself: they share
    # one round trip. (The keyed routes, Affixo's and Refport's, look for the link in the
    # caller's workspace: their refusals are their own.)
    routes = ROOT / "ingest" / "edge" / "routes"
    names = {"append", "append_keyed"}
    direct: list[tuple[str, str]] = []
    notes: list[str] = []
    for path in sorted(routes.glob("*.py")):
        tree = ast.parse(path.read_text())
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and n.module in ("ingest.edge.enqueue", "ingest.edge.keyed"):
                direct += [(path.name, a.name) for a in n.names if a.name in names]
        if path.stem in ("affitor", "biore", "bricqs", "browser") and '"unknown_code"' in path.read_text():
            notes.append(path.name)
    assert direct == []
    assert notes == [], "a route accounts the link's refusals itself: accept.refusal does"


def test_every_error_is_in_the_one_tree() -> None:
    """Every exception class the project defines is a ``RefstreamError``, under the branch
    that says what its caller does next (``ingest/contract/errors.py``): one spelling of
    "outcome unknown", one of "not sent", one of each."""
    import importlib
    import inspect

    from ingest.contract import errors

    branches = (errors.NotSent, errors.OutcomeUnknown, errors.Outage, errors.Refused, errors.Misconfigured)
    outside: list[str] = []
    rootless: list[str] = []
    for top in ("ingest", "workers", "refstream"):
        for f in sorted((ROOT / top).rglob("*.py")):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            module = importlib.import_module(name)
            for cls_name, cls in inspect.getmembers(module, inspect.isclass):
                if cls.__module__ != name or not issubclass(cls, BaseException):
                    continue
                if not issubclass(cls, errors.RefstreamError):
                    outside.append(f"{name}.{cls_name}")
                elif name != errors.__name__ and not issubclass(cls, branches):
                    rootless.append(f"{name}.{cls_name}")
    assert outside == [], "errors outside ingest.contract.errors' tree"
    assert rootless == [], "errors on the tree's root, not on a branch that says what to do next"


def test_the_batch_route_imports_no_sibling_route() -> None:
    routes = ROOT / "ingest" / "edge" / "routes"
    siblings = {f"ingest.edge.routes.{p.stem}" for p in routes.glob("*.py")}
    batch = _imports(routes / "batch.py", top_level_only=False)
    assert sorted(batch & siblings) == []
