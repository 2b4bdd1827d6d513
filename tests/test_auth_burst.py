"""A burst of requests on a key the edge has not cached asks Postgres once
(``Authenticator.asked_once``): the others wait for that answer, not for a place of their
own behind the fallback's few (the clean-clone run saw a burst of 48 answered 503)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ingest.contract.keys import Keys
from ingest.edge.auth import Authenticator


def _auth() -> Authenticator:
    return Authenticator(redis=None, keys=Keys("t", 4), pg=None, ttl_s=60)  # type: ignore[arg-type]


async def test_a_burst_on_one_key_asks_once_and_each_hears_the_answer() -> None:
    auth, asked, gate = _auth(), [], asyncio.Event()

    async def ask() -> Any:
        asked.append(1)
        await gate.wait()
        return None

    burst = [asyncio.ensure_future(auth.asked_once(b"k", ask)) for _ in range(48)]
    await asyncio.sleep(0)  # every caller has joined before the answer comes
    gate.set()
    assert await asyncio.gather(*burst) == [None] * 48
    assert len(asked) == 1
    gate.clear()
    gate.set()
    await auth.asked_once(b"k", ask)  # answered: the next request asks anew
    assert len(asked) == 2


async def test_a_failed_question_fails_each_caller_and_a_cancelled_one_leaves_it_to_the_others() -> None:
    auth, gate = _auth(), asyncio.Event()

    async def ask() -> Any:
        await gate.wait()
        raise TimeoutError("postgres")

    first = asyncio.ensure_future(auth.asked_once(b"k", ask))
    second = asyncio.ensure_future(auth.asked_once(b"k", ask))
    await asyncio.sleep(0)
    first.cancel()
    gate.set()
    with pytest.raises(TimeoutError):
        await second
    assert first.cancelled()
    assert auth._asking == {}
