"""The rooms of ARCHITECTURE.md hold: each imports only what its row says it may, and no
module imports itself back through others (no import circles)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.once

ROOT = Path(__file__).resolve().parent.parent

# room -> the rooms (or single modules) it may import; ARCHITECTURE.md's "May import" column
MAY_IMPORT: dict[str, set[str]] = {
    "ingest.contract": set(),
    "ingest.edge": {"ingest.contract", "ingest.spool"},
    "ingest.spool": {"ingest.contract", "ingest.edge.idempotency", "ingest.edge.durability", "ingest.edge.redislink"},
    "ingest.host": {"ingest.contract", "ingest.edge", "ingest.spool", "ingest.manage"},
    "ingest.manage": {"ingest.contract", "ingest.edge"},
    "workers.group": {"ingest.contract"},
    "workers.consumer": {
        "ingest.contract",
        "workers.group",
        "ingest.edge.metrics",  # the latency buckets, so the edge's and the workers' histograms compare
        "ingest.manage.secretbox",  # webhook signing secrets, sealed by the management API
        "ingest.manage.targets",  # the webhook target check, the management API's own
        "ingest.manage.outbox",  # the webhook outbox, which the management API's writes use too
        "ingest.manage.refunds",  # a refunded sale that earns late gets its refunds' clawbacks
        "workers.ops.replay",  # the arq worker hosts the replay job
        "workers.ops.erasure",  # ... and the erasure sweep,
        "ingest.manage.erasure_late",  # an erased person's late lead scrubs what it links them to
        "ingest.manage.erasure_copy",  # a worker's first batch waits for the erasures Postgres lost
        "workers.archive.store",  # ... which rewrites the archive's segments
    },
    "workers.archive": {"ingest.contract", "workers.group"},
    "workers.ops": {
        "ingest.contract",
        "ingest.spool",
        "workers.group",
        "workers.consumer",
        "workers.archive",
        "ingest.manage.erasure",  # an erasure's record, as the management API shows it
        "ingest.manage.erasure_late",  # ... and its re-check of Postgres
        "ingest.manage.erasure_copy",  # ... and its copy in Redis, kept by the sweep, restored by a replay
        "ingest.manage.refunds",  # an imported refund, recorded as the edge records one
        "ingest.edge.suppress",  # the do-not-track lists, as the edges read them, for an import
        "ingest.edge.fields",  # an import's rows checked by the routes' own field types
        "ingest.edge.sale",  # ... and a sale's
    },
}
# a dialect's own management calls: Bricqs' referral codes and participant stats; a refund,
# recorded in Postgres at once (its 409 depends on the refunds before it)
EXCEPTIONS = {("ingest.edge.routes.bricqs", "ingest.manage.admin"), ("ingest.edge.refund", "ingest.manage.refunds")}


def _modules() -> dict[str, Path]:
    out = {}
    for top in ("ingest", "workers"):
        for f in (ROOT / top).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out[name] = f
    return out


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """The project's modules ``path`` imports (``from pkg import module`` as the module)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            found |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            for a in n.names:  # ``from package import module`` imports the module (and the package's __init__ first)
                found.add(f"{n.module}.{a.name}" if f"{n.module}.{a.name}" in MODULES else n.module)
    return {m for m in found if m.split(".")[0] in ("ingest", "workers", "refstream")}


MODULES = _modules()


def _room(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _allowed(src: str, dst: str) -> bool:
    if _room(src) == _room(dst) or (src, dst) in EXCEPTIONS:
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
    modules = MODULES
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
    # issue 25: the routes repeated lookup -> refusal -> append each in its own way; now the
    # appends (``enqueue.append``, ``keyed.append_keyed``) and the public link's refusals
    # (the drops they account) are ``ingest/edge/accept.py``'s. The batch route alone sends
    # its items' appends itself: they share one round trip. (The keyed routes, Affixo's and
    # Refport's, look for the link in the caller's workspace: their refusals are their own.)
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
