"""`python -m bench --set NAME=VALUE`: a setting reaches the edge's and workers' processes as
REFSTREAM_NAME, where the shell's own REFSTREAM_ variables never do (so an A/B of a setting
measures the setting); a name that is no setting, a value it refuses and a setting the bench
gives its processes itself are refused before anything starts."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import click
import pytest

from bench.__main__ import _settings
from bench.context import Options
from bench.runner import BENCH_SETS, _env

pytestmark = pytest.mark.once


def _opts(settings: tuple[tuple[str, str], ...]) -> Options:
    return Options(
        duration=1.0,
        warmup=1.0,
        runs=1,
        only=frozenset({"cap"}),
        connections=1,
        batch_connections=1,
        backlog_seconds=1.0,
        drain_events=1,
        workers=1,
        partitions=4,
        batch_size=500,
        profile_dir=None,
        settings=settings,
    )


def test_a_set_setting_reaches_the_processes_and_the_shells_do_not(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("REFSTREAM_LINGER_MS", "20")  # the shell's: never passed on
    monkeypatch.setenv("REFSTREAM_LOG_LEVEL", "debug")  # one the bench passes on
    svc = cast(Any, SimpleNamespace(redis_url="redis://127.0.0.1:1/0"))
    env = _env(svc, _opts(()), str(Path("/nonexistent")))
    assert "REFSTREAM_LINGER_MS" not in env and env["REFSTREAM_LOG_LEVEL"] == "debug"
    chosen = _settings(("linger_ms=0", " Block_MS =250"))
    assert chosen == (("linger_ms", "0"), ("block_ms", "250"))
    env = _env(svc, _opts(chosen), str(Path("/nonexistent")))
    assert env["REFSTREAM_LINGER_MS"] == "0" and env["REFSTREAM_BLOCK_MS"] == "250"
    assert env["REFSTREAM_PARTITIONS"] == "4"  # the bench's own, as before


@pytest.mark.parametrize(
    ("item", "why"),
    [
        ("linger_ms", "expected NAME=VALUE"),
        ("no_such_setting=1", "expected NAME=VALUE"),
        ("linger_ms=soon", "valid number"),
        ("linger_ms=-1", "greater than or equal to 0"),
        ("partitions=8", "the bench sets it itself"),
    ],
)
def test_a_set_that_is_no_setting_or_no_value_of_it_is_refused(item: str, why: str):
    with pytest.raises(click.BadParameter, match=why):
        _settings((item,))


def test_the_bench_sets_only_settings_that_exist():
    from ingest.contract.settings import Settings

    assert BENCH_SETS <= set(Settings.model_fields)
