"""The generative test, in Jepsen's manner: for each seed, a random schedule of client
operations (every event route, keyed and not, the batch route, redirects, Bricqs' reads;
retried after timeouts and 5xx as real clients do) and of faults (Redis stalled, killed,
restarted, full; a Sentinel failover at replicas:1; Postgres killed, read-only, slow;
edges, workers and archivers SIGKILLed or SIGSTOPped; one process's clock offset; a link
blackholed one way; trims with no retention; replays racing the workers), then everything
healed, drained, and a checker over the whole history (``_gen/checker.py``).

    .venv/bin/python -m pytest -m faults tests/faults/test_generative.py     # short: 1 fresh seed
    scripts/faults --duration 60m -k generative                              # new seeds for an hour
    REFSTREAM_FAULTS=short REFSTREAM_GEN_SEED=1234 scripts/faults -k generative   # one seed again

Seeds are fresh each run (printed); a failing one prints the command that runs it again, and
keeps its logs and history in ``$TMPDIR/refstream-gen-<seed>/``. The schedule is the seed's
alone; the system's own timing is not, so a run is reproduced in its operations and faults.
"""

from __future__ import annotations

import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from ._gen import erased, ops
from ._gen.checker import GenChecker
from ._gen.history import Attempt, History, Op, Unit
from ._gen.judge import derived_problems
from ._gen.ops import World, dub_click, dub_lead
from ._gen.run import SeedResult, run_seed
from ._gen.schedule import TOPOLOGIES, duration_from_env, seeds_from_env
from ._plan import Plan
from ._servers import PgServer
from ._stage import FIGURES

# scripts/test's short mode: one seed, of a topology drawn each run (two took about 20 min of
# the fault pass beside the first pass, on a loaded 2-core machine); the full mode
# (scripts/faults) runs many, alternating the topologies
SHORT_SEEDS = 1
FULL_DEFAULT_S = 300.0  # scripts/faults without --duration


def _budget() -> float:
    return duration_from_env() or FULL_DEFAULT_S


def seeds(mode: str) -> Iterator[int]:
    """REFSTREAM_GEN_SEED's seeds (one, or a comma-separated list) alone, or first when
    REFSTREAM_GEN_DURATION is set too; else fresh seeds, alternating the topologies from one
    drawn at random: one in short mode, as many as start within REFSTREAM_GEN_DURATION (or
    5 min) in full mode or when set. A duration counts from the first seed's start."""
    duration = duration_from_env()
    deadline = time.monotonic() + (duration or FULL_DEFAULT_S)
    given = seeds_from_env()
    yield from given
    if given and duration is None:
        return
    rng = random.SystemRandom()
    i = rng.randrange(len(TOPOLOGIES))  # the first seed's topology
    start = i
    while (i - start < SHORT_SEEDS) if mode == "short" and duration is None else time.monotonic() < deadline:
        seed = rng.randrange(1, 1 << 31)
        yield seed - seed % len(TOPOLOGIES) + i % len(TOPOLOGIES)
        i += 1


def _total(results: list[SeedResult]) -> str:
    ops: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    anomalies: Counter[str] = Counter()
    shards: Counter[str] = Counter()
    for r in results:
        ops.update(r.ops)
        faults.update(r.faults)
        anomalies.update(r.anomalies.counts())
        shards.update(r.shards)

    def fmt(c: Counter[str]) -> str:
        return ",".join(f"{k}={n}" for k, n in sorted(c.items())) or "none"

    return (
        f"GENERATIVE total: seeds={len(results)} ({','.join(str(r.seed) for r in results)})"
        f" wall={sum(r.wall_s for r in results):.0f}s ops={sum(ops.values())} ({fmt(ops)})"
        f" stored={sum(r.stored for r in results)} archived={sum(r.archived for r in results)}"
        f" faults={sum(faults.values())} ({fmt(faults)}) shards ({fmt(shards)})"
        f" anomalies={sum(anomalies.values())} ({fmt(anomalies)})"
    )


@pytest.fixture
async def shard_pg() -> AsyncIterator[PgServer]:
    """Shard b's Postgres (``_gen/shards.py``), a second primary of the test's own: each seed
    makes its database there, and its nemesis stops and starts it."""
    server = PgServer()
    try:
        server.init()
        server.start()  # from the main thread: the parent-death signal belongs to it
        await server.ready()
        yield server
    finally:
        server.destroy()


@pytest.mark.faults
@pytest.mark.timeout(int(_budget()) + 900)
async def test_generative(pg_server: PgServer, shard_pg: PgServer, plan: Plan) -> None:
    results: list[SeedResult] = []
    for seed in seeds(plan.mode):
        print(f"\ngenerative: seed {seed} ({plan.mode})", file=sys.stderr, flush=True)
        result = await run_seed(seed, plan.mode, pg_server, plan, shard_pg)
        results.append(result)
        FIGURES.append(result.line())
        print(result.line(), flush=True)
    FIGURES.append(_total(results))
    print(_total(results), flush=True)
    failed = [r for r in results if r.anomalies.found]
    if failed:
        raise AssertionError(
            "\n\n".join(
                f"seed {r.seed} ({r.schedule.topology}): {sum(r.anomalies.counts().values())} anomalies; run it again:"
                f"\n  {r.reproduce()}\nlogs and history: {r.kept}\nfaults:\n{r.schedule.describe()}\n"
                f"{r.anomalies.report()}"
                for r in failed
            )
        )


# -- the checker can fail: histories and rows made by hand (no servers) ----------------

WORLD = World(["c0"], "key", "program", "affiliate", "aff")


def _op(kind: str, outcomes: list[tuple[str, int | None, Any]], *, key: str | None = None, **unit: Any) -> Op:
    op = Op(0, kind, "g1-0", key, "POST", "/", {}, None, [Unit("g1-0", unit.pop("what", "click"), "c0", **unit)])
    op.attempts = [Attempt("e1", float(i), status=s, body=b, outcome=o) for i, (o, s, b) in enumerate(outcomes)]
    return op


def _row(token: str, event: uuid.UUID | None = None, **cols: Any) -> dict[str, Any]:
    return {
        "event_id": event or uuid.uuid4(),
        "token": token,
        "code": "c0",
        "click_id": None,
        "visitor_id": None,
        **cols,
    }


def _judge(op: Op, rows: list[dict[str, Any]], *others: Op) -> Counter[str]:
    """The checker's verdict on ``op`` and its unit's rows (``others``: operations it names)."""
    history = History(1)
    history.ops = {o.n: o for o in (*others, op)}
    checker = GenChecker(history, WORLD, None, Path("."), "")  # type: ignore[arg-type]  # judging reads no database
    checker.by_token = {r["token"]: [x for x in rows if x["token"] == r["token"]] for r in rows}
    checker._answers(op)
    by_event = {r["event_id"].hex: r for r in rows}
    for i, unit in enumerate(op.units):
        mine = [r for r in rows if r["token"] == unit.token and unit.name in (None, r.get("name"))]
        checker._unit(op, i, unit, mine, by_event)
    return checker.a.counts()


def test_the_seeds_given_run_alone_or_first_within_a_duration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFSTREAM_GEN_SEED", "493051949, 1246373390")
    monkeypatch.delenv("REFSTREAM_GEN_DURATION", raising=False)
    assert list(seeds("full")) == [493051949, 1246373390]
    monkeypatch.setenv("REFSTREAM_GEN_DURATION", "1h")
    drawn = seeds("full")
    first = [next(drawn) for _ in range(4)]
    assert first[:2] == [493051949, 1246373390] and len(set(first)) == 4  # fresh seeds fill the hour


def test_the_checker_flags_an_accepted_click_not_stored() -> None:
    assert _judge(_op("biore", [("ok", 200, {"success": True, "data": {"tracked": True}})], once=False), []) == {
        "lost": 1
    }


def test_the_checker_flags_a_refused_click_stored() -> None:
    op = _op("biore", [("refused", 503, None), ("refused", 503, None)], once=False)
    assert _judge(op, [_row("g1-0")]) == {"refusal_counted": 1}


def test_the_checker_allows_an_unknown_attempt_stored_beside_the_accepted_one() -> None:
    op = _op("biore", [("unknown", None, None), ("ok", 200, {"success": True, "data": {"tracked": True}})], once=False)
    assert _judge(op, [_row("g1-0"), _row("g1-0")]) == {}
    keyed = _op(
        "biore",
        [("unknown", None, None), ("ok", 200, {"success": True, "data": {"tracked": True}})],
        key="k",
        once=True,
    )
    assert _judge(keyed, [_row("g1-0"), _row("g1-0")]) == {"duplicate": 1}


def test_the_checker_flags_an_answer_naming_another_requests_event() -> None:
    other = uuid.uuid4()
    answer = {"success": True, "click_id": f"clk_{other.hex}", "partner_code": "c0", "cookie_window_days": 30}
    op = _op("affitor", [("ok", 200, answer)], once=False)
    op.echo = {"partner_code": "c0"}
    assert _judge(op, [_row("g1-0"), _row("g1-7", other)]) == {"foreign_answer": 1}


def test_the_checker_flags_a_lead_stored_on_another_click_and_a_500() -> None:
    click = uuid.uuid4()
    op = _op(
        "lead", [("error", 500, None), ("unknown", None, None)], what="lead", once=True, expect={"click_id": click.hex}
    )
    assert _judge(op, [_row("g1-0", click_id=uuid.uuid4())]) == {"5xx": 1, "foreign_answer": 1}


def test_the_checker_flags_a_row_reading_back_another_requests_user_agent() -> None:
    ua = "Mozilla/5.0 gen/g1-0"
    ok = ("ok", 200, {"success": True, "data": {"tracked": True}})
    op = _op("biore", [ok], once=False, expect={"user_agent": ua})
    assert _judge(op, [_row("g1-0", user_agent=ua)]) == {}
    assert _judge(op, [_row("g1-0", user_agent="Mozilla/5.0 gen/g1-7")]) == {"foreign_answer": 1}
    assert _judge(op, [_row("g1-0", user_agent=None)]) == {}  # erased since: the erasure's checks judge it


def _sale(outcomes: list[tuple[str, int | None, Any]], *, invoice: str | None, route: str = "refport") -> Op:
    op = _op("sale", outcomes, key=f"invoice:{invoice}" if invoice else None, what="sale", once=invoice is not None)
    op.units[0].code = None  # the workers attribute a sale: any link, or none
    op.echo = {"customer": "g1-0", "amount": 4900, "invoice": invoice, "route": route}
    return op


def _sold(amount: int = 4900, invoice: str | None = "inv-g1-0", customer: str = "g1-0") -> dict[str, Any]:
    sale = {"amount": amount, "currency": "usd", "paymentProcessor": "stripe", "invoiceId": invoice}
    return {"eventName": "Purchase", "customer": {"externalId": customer}, "sale": sale}


def test_the_checker_flags_an_invoice_stored_twice() -> None:
    op = _sale([("unknown", None, None), ("ok", 200, _sold())], invoice="inv-g1-0")
    assert _judge(op, [_row("g1-0", code=None)]) == {}
    assert _judge(op, [_row("g1-0", code=None), _row("g1-0", code="c0")]) == {"duplicate": 1}


def test_the_checker_flags_a_sale_answer_of_another_request_and_a_refused_sale_counted() -> None:
    foreign = _sale([("ok", 200, _sold(amount=1, customer="g1-9"))], invoice=None)
    assert _judge(foreign, [_row("g1-0", code=None)]) == {"foreign_answer": 1}
    refused = _sale([("refused", 503, None), ("refused", 503, None)], invoice="inv-g1-0")
    assert _judge(refused, [_row("g1-0", code=None)]) == {"refusal_counted": 1}
    answer = {
        "ok": True,
        "conversion_id": str(uuid.uuid4()),
        "customer_id": "g1-0",
        "amount": 4900,
        "currency": "usd",
        "invoice_id": None,
    }
    affixo = _sale([("ok", 200, answer)], invoice=None, route="affixo")
    assert _judge(affixo, [_row("g1-0", code=None)]) == {"lost": 1}  # the event it names is not the stored one


def test_the_checker_reads_an_erased_lead_and_its_click_back_to_their_requests() -> None:
    """An erase answered 202 makes its customer ``done``, one with no answer ``maybe``, one
    only refused neither; the lead's click is found by the event id its answers named."""
    history = History(1)
    click_event = uuid.uuid4()
    click = _op("affitor", [("ok", 200, {"success": True, "click_id": f"clk_{click_event.hex}"})], once=False)
    click.n, click.token = 1, "g1-1"
    lead = _op("lead", [("ok", 200, {})], what="lead", once=True)
    lead.n, lead.token, lead.echo = 2, "g1-2", {"click": f"clk_{click_event.hex}"}
    history.ops = {1: click, 2: lead}
    for n, outcome in ((3, "ok"), (4, "unknown"), (5, "refused")):
        erase = _op("erase", [(outcome, {"ok": 202, "refused": 503}.get(outcome), None)], once=False)
        erase.n, erase.kind, erase.units, erase.echo = n, "erase", [], {"customer": f"c{n}", "lead": 2}
        history.ops[n] = erase
    found = erased.erasures(history)
    assert (found.done, found.maybe) == ({"c3"}, {"c4"})
    assert found.clicks == {click_event.hex: "g1-1"} and found.referrers["c3"] == ops.referrer("g1-1")


def test_the_checker_flags_a_click_of_an_expired_key_answered_or_stored() -> None:
    def expired(outcomes: list[tuple[str, int | None, Any]]) -> Op:
        op = _op("affixo", outcomes, once=False)
        op.echo = {"refuse": "expired_key_accepted"}
        return op

    refused: list[tuple[str, int | None, Any]] = [("refused", 401, {"error": "unauthorized"})]
    assert _judge(expired(refused), []) == {}
    assert _judge(expired(refused), [_row("g1-0")]) == {"refusal_counted": 1}
    answer = {"ok": True, "click_id": "x", "visitor_id": "v"}
    accepted: list[tuple[str, int | None, Any]] = [("ok", 200, answer)]
    assert _judge(expired(accepted), [_row("g1-0")])["expired_key_accepted"] == 1


def _dub_lead(outcomes: list[tuple[str, int | None, Any]], **body: Any) -> tuple[Op, uuid.UUID]:
    click = uuid.uuid4()
    sent = {"clickId": f"clk_{click.hex}", "eventName": "Sign Up", "customerExternalId": "g1-0", **body}
    never = "deferred_counted" if body.get("mode") == "deferred" else ""
    op = dub_lead(0, "g1-0", sent, {}, customer="g1-0", click=f"clk_{click.hex}", code="c0", never=never)
    op.attempts = [Attempt("e1", float(i), status=s, body=b, outcome=o) for i, (o, s, b) in enumerate(outcomes)]
    return op, click


def _led(click: uuid.UUID) -> tuple[str, int, Any]:
    answer = {"click": {"id": f"clk_{click.hex}"}, "link": {"key": "c0"}, "customer": {"externalId": "g1-0"}}
    return ("ok", 200, answer)


def test_the_checker_flags_a_deferred_lead_stored_and_a_lead_counting_another_quantity() -> None:
    deferred, click = _dub_lead([], mode="deferred")
    deferred.attempts = [Attempt("e1", 0.0, status=200, body=_led(click)[2], outcome="ok")]
    assert _judge(deferred, []) == {}
    assert _judge(deferred, [_row("g1-0", name="Sign Up", click_id=click, quantity="1")]) == {"deferred_counted": 1}
    assert _judge(deferred, [_row("g1-0", name="Activated", click_id=click, quantity="1")]) == {}  # its completion's
    lead, click = _dub_lead([], eventQuantity=1000)
    lead.attempts = [Attempt("e1", 0.0, status=200, body=_led(click)[2], outcome="ok")]
    assert _judge(lead, [_row("g1-0", name="Sign Up", click_id=click, quantity="1000")]) == {}
    assert _judge(lead, [_row("g1-0", name="Sign Up", click_id=click, quantity="1")]) == {"foreign_answer": 1}
    assert _judge(lead, []) == {"lost": 1}


def test_the_checker_holds_a_dub_click_again_to_its_first_id() -> None:
    first_event, new_event = uuid.uuid4(), uuid.uuid4()
    first = dub_click(1, "g1-1", WORLD, "c0")
    clicked = {"clickId": f"clk_{first_event.hex}", "partner": None, "discount": None}
    first.attempts = [Attempt("e1", 0.0, status=200, body=clicked, outcome="ok")]
    again = dub_click(2, "g1-2", WORLD, "c0", ua=first.headers["User-Agent"], repeat_of=1)
    again.attempts = [Attempt("e1", 1.0, status=200, body=clicked, outcome="ok")]
    stored = [_row("g1-1", first_event, user_agent=first.headers["User-Agent"])]
    assert _judge(again, stored, first) == {}
    again.attempts[0].body = {**clicked, "clickId": f"clk_{new_event.hex}"}  # counted again, under no fault
    counted = [*stored, _row("g1-2", new_event, user_agent=first.headers["User-Agent"])]
    assert _judge(again, counted, first) == {"dub_repeat_counted": 1}
    assert _judge(again, stored, first) == {"dub_repeat_counted": 1, "lost": 2}  # a new id, and not stored


def test_the_checker_flags_a_dub_refusal_not_in_dubs_shape() -> None:
    doc = "https://dub.co/docs/api-reference/errors#not-found"
    dubs = {"error": {"code": "not_found", "message": "Click event not found", "doc_url": doc}}
    lead, _ = _dub_lead([("refused", 404, dubs)], clickId="clk_" + "0" * 32)
    lead.echo.update(refuse="unknown_click_accepted", status=404)
    assert _judge(lead, []) == {}
    lead.attempts[0].body = {"error": {"code": "INVALID_CLICK_ID", "message": "Unknown clickId"}}  # Refport's
    assert _judge(lead, []) == {"dub_shape": 1}
    lead.attempts[0].status = 400
    lead.attempts[0].body = {**dubs, "error": {**dubs["error"], "code": "bad_request"}}
    assert _judge(lead, []) == {"dub_shape": 1, "wrong_refusal": 1}  # its doc_url names another code too


def test_the_checker_flags_a_deferred_leads_click_forgotten() -> None:
    deferred, click = _dub_lead([], mode="deferred")
    deferred.n = 1
    body = {"eventName": "Activated", "customerExternalId": "g1-0", "clickId": ""}
    complete = dub_lead(2, "g1-2", body, {}, customer="g1-0", click=f"clk_{click.hex}", code="c0", deferred=1)
    doc = "https://dub.co/docs/api-reference/errors#bad-request"
    no_click = {"error": {"code": "bad_request", "message": "no click", "doc_url": doc}}
    complete.attempts = [Attempt("e1", 1.0, status=400, body=no_click, outcome="refused")]
    deferred.attempts = [Attempt("e1", 0.0, status=200, body=_led(click)[2], outcome="ok")]
    assert _judge(complete, [], deferred) == {"deferred_forgotten": 1}
    deferred.attempts = [Attempt("e1", 0.0, status=503, outcome="refused")]  # it remembered nothing
    complete.echo["allow"] = [400]
    assert _judge(complete, [], deferred) == {}


def test_the_checker_flags_a_row_taken_back_in_another_currency() -> None:
    """A reversal or a clawback in another currency than the row it takes back (issue 64:
    a lead earned in usd taken back in eur once ``lead_currency`` changed), or of no row."""
    lead, sale = uuid.uuid4(), uuid.uuid4()
    rows: list[dict[str, Any]] = [
        {"kind": "reversal", "rule": "lead", "source_id": lead, "sale_id": None, "amount": -100, "currency": "usd"},
        {"kind": "clawback", "rule": None, "source_id": uuid.uuid4(), "sale_id": sale, "amount": -5, "currency": "eur"},
    ]
    assert derived_problems([{**r, "of_currency": r["currency"]} for r in rows]) == []
    taken_in_eur = [{**rows[0], "currency": "eur", "of_currency": "usd"}, {**rows[1], "of_currency": None}]
    assert len(derived_problems(taken_in_eur)) == 2
