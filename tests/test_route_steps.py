"""A route is the list of steps its dialect needs (issue 65 item 2, issue 66 decision 1).

Each tracking route declares its steps (its module's ``STEPS``), and its handler takes them,
in that order, as straight calls of shared functions: this test reads each handler (and the
module's own helpers and the dialect's ``sale``/``lead`` functions it calls) and holds the
calls of steps to the list. Each step has one implementation (no other function of its name
in ``ingest/edge``), and each list fits its dialect: a public route looks up its link and
says its refusals (``accept.look``, ``accept.refusal``), a keyed one its caller; a sale reads
no link nor click, bar the lead Dub's API makes first from the click its body names.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

from aiohttp import web

from ingest.edge import accept, body, enqueue, keyed, lead, lookup, resolve, sale

ROOT = Path(__file__).resolve().parents[1]
ROUTES = ("affitor", "affixo", "batch", "biore", "bricqs", "browser", "dub", "refport")

# every step a tracking route is made of: parse, authenticate and rate-limit, resolve the
# link (or click), make the event, append it, answer
CATALOGUE: tuple[Callable[..., Any], ...] = (
    body.read,
    body.parse,
    accept.parsed,
    accept.caller,
    lookup.key_lookup,
    accept.look_keyed,
    accept.look,
    accept.refusal,
    accept.unknown_code,
    resolve.seen_link,
    resolve.resolve_click,
    accept.prior_click,
    accept.event,
    accept.click,
    enqueue.put,
    keyed.put_once,
    accept.accepted,
)
FOLLOWED = {"ingest.edge.sale", "ingest.edge.lead"}  # a dialect's route, told in its own module
PUBLIC = {("biore", "track_click"), ("affitor", "track_click"), ("dub", "track_click")}
PUBLIC |= {("bricqs", "convert"), ("browser", "redirect")}
UNKEYED = {("dub", "track_click"), ("bricqs", "convert"), ("browser", "redirect")}  # they take no key
KEYED = {"accept.caller", "accept.look_keyed", "lookup.key_lookup"}
LINKS = {"accept.look", "accept.look_keyed", "accept.refusal", "resolve.seen_link", "resolve.resolve_click"}
LINKS |= {"accept.prior_click"}


def name(step: Callable[..., Any]) -> str:
    return f"{step.__module__.rsplit('.', 1)[1]}.{step.__name__}"


def _callee(module: ModuleType, call: ast.Call) -> object:
    f = call.func
    if isinstance(f, ast.Name):
        return getattr(module, f.id, None)
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
        base = getattr(module, f.value.id, None)
        return getattr(base, f.attr, None) if inspect.ismodule(base) else None
    return None


def taken(fn: Callable[..., Any], seen: set[object] | None = None) -> list[str]:
    """The steps ``fn`` calls, in the order of its text, through its module's private
    helpers and the dialect modules' functions; each once, where it is first called."""
    seen = set() if seen is None else seen
    fn = inspect.unwrap(fn)
    module = importlib.import_module(fn.__module__)
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    calls = sorted((n for n in ast.walk(tree) if isinstance(n, ast.Call)), key=lambda n: (n.lineno, n.col_offset))
    out: list[str] = []
    for call in calls:
        callee = _callee(module, call)
        if callee in CATALOGUE:
            out.append(name(callee))
        elif inspect.isfunction(callee) and callee not in seen:
            mine = callee.__module__ == fn.__module__ and callee.__name__.startswith("_")
            if mine or callee.__module__ in FOLLOWED:
                seen.add(callee)
                out += taken(callee, seen)
    return list(dict.fromkeys(out))


def handlers() -> list[tuple[str, str, Callable[..., Any], tuple[Callable[..., Any], ...]]]:
    """(module, handler, the handler, its declared steps) for every tracking route."""
    out = []
    for m in ROUTES:
        module = importlib.import_module(f"ingest.edge.routes.{m}")
        declared: dict[str, tuple[Callable[..., Any], ...]] = module.STEPS
        for route in module.routes:
            assert isinstance(route, web.RouteDef)
            h = route.handler
            out.append((m, h.__name__, h, declared[h.__name__]))  # a route without a list fails here
        assert set(declared) == {h.__name__ for r in module.routes if isinstance(r, web.RouteDef) for h in [r.handler]}
    return out


def test_each_route_takes_the_steps_it_lists_in_their_order() -> None:
    checked = 0
    for m, h, handler, steps in handlers():
        assert all(s in CATALOGUE for s in steps), (m, h)
        assert taken(handler) == [name(s) for s in steps], (m, h)
        checked += 1
    assert checked >= 14


def test_each_step_has_one_implementation() -> None:
    defined: dict[str, list[str]] = {}
    for path in sorted((ROOT / "ingest" / "edge").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                defined.setdefault(node.name, []).append(str(path.relative_to(ROOT)))
    for step in CATALOGUE:
        module = step.__module__.replace(".", "/") + ".py"
        assert defined[step.__name__] == [module], (name(step), defined[step.__name__])


def test_each_list_fits_its_dialect() -> None:
    for m, h, _, steps in handlers():
        names = {name(s) for s in steps}
        if (m, h) in PUBLIC:  # public: the link's lookup and refusals, never a caller's
            assert {"accept.look", "accept.refusal"} <= names and names & {"accept.event", "accept.click"}, (m, h)
            assert not names & KEYED, (m, h)
        elif steps:  # keyed: its caller first (a HEAD and a read of a code are public, and append nothing)
            public_read = (m, h) in {("bricqs", "validate"), ("browser", "redirect_head")}
            assert public_read or (names & KEYED and "accept.refusal" not in names), (m, h)
        if (m, h) in UNKEYED:  # no idempotency key: a plain append alone
            assert "keyed.put_once" not in names and "enqueue.put" in names, (m, h)
    # a sale: its caller, its append (keyed by its key or invoice, else plain) and its answer;
    # no link, no click: Dub's API makes the customer's lead first from its click, a step of
    # the dialect (``SaleDialect.lead_first``)
    assert not {name(s) for s in sale.STEPS} & LINKS
    for m in ("refport", "dub", "affixo"):
        module = importlib.import_module(f"ingest.edge.routes.{m}")
        dialect = module.CONVERSION if m == "affixo" else module.SALE
        assert dialect.lead_first is (sale.direct_lead if issubclass(dialect.model, sale.TrackSale) else None), m
    assert "resolve.resolve_click" in {name(s) for s in lead.STEPS}


def test_a_click_without_a_key_never_reaches_the_idempotency_records() -> None:
    # a plain append (``enqueue.put``) is its own step: the keyed one (``keyed.put_once``)
    # alone reads or writes a key's records
    tree = ast.parse(inspect.getsource(enqueue))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not imported & {"ingest.edge.idempotency", "ingest.edge.keyed"}


def test_every_route_that_looks_up_a_code_keeps_the_unknown_ones_for_the_console() -> None:
    # issue 65 item 7: one refusal step for all (``accept.refusal`` takes it for a public route)
    codes = PUBLIC | {("affixo", "track_click"), ("batch", "batch")}
    for m, h, _, steps in handlers():
        if (m, h) in codes:
            assert {name(s) for s in steps} & {"accept.refusal", "accept.unknown_code"}, (m, h)

    noted: list[tuple[Any, ...]] = []
    drops = SimpleNamespace(note=lambda *a: noted.append(("note", *a)), refused=lambda *a: noted.append(("tail", *a)))
    edge: Any = SimpleNamespace(drops=drops)
    found: Any = SimpleNamespace(verdict=SimpleNamespace(allowed=True), link_unresolved=False, link=None)
    assert accept.refusal(edge, "biore_click", "NOPE", found, None) is accept.Refusal.UNKNOWN_CODE
    accept.unknown_code(edge, "batch", "GONE", "ws1")
    accept.unknown_code(edge, "dub_click", None)  # a key not fit to show: a drop alone
    assert noted == [
        ("note", None, None, "unknown_code"),
        ("tail", "NOPE", "biore_click"),
        ("note", "ws1", None, "unknown_code"),
        ("tail", "GONE", "batch"),
        ("note", None, None, "unknown_code"),
    ]
