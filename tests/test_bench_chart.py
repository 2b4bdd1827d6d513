"""The goals' chart (``bench.chart``, docs/benchmarks.md): one series per goal that the
records in ``bench/results/`` measured, each with a point per record, quick runs left out;
the checked-in ``docs/benchmarks-goals.svg`` is the chart those records draw; and a run the
bench records (``report.record``) is read back as a record of its own."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench import chart, report

pytestmark = pytest.mark.once

ROOT = Path(__file__).resolve().parent.parent


def _series(svg: str) -> dict[str, int]:
    return {goal: int(n) for goal, n in re.findall(r'<g class="series" data-goal="([^"]+)" data-points="(\d+)">', svg)}


def _write(path: Path, name: str, **record: object) -> None:
    (path / f"{name}.json").write_text(json.dumps(record))


def test_one_series_per_goal_measured_with_a_point_per_record(tmp_path: Path) -> None:
    _write(tmp_path, "b", date="2026-11-28", title="later", figures={"d.ratio": 0.93, "b000.ratio_a": 0.32})
    _write(tmp_path, "a", date="2026-11-27", title="earlier", figures={"d.ratio": 0.84, "not.a_goal": 1.0})
    _write(tmp_path, "q", date="2026-11-29", title="smoke", quick=True, figures={"f.multiple": 9.9, "d.ratio": 0.1})
    records = chart.load(tmp_path)
    assert [r["title"] for r in records] == ["earlier", "later", "smoke"]
    svg = chart.svg(chart.series(records))
    assert _series(svg) == {"b000.ratio_a": 1, "d.ratio": 2}
    assert svg.count("<circle") == 3
    assert "0.93" in svg and "0.84" in svg and "9.9" not in svg  # the quick run is not drawn
    assert svg.count('class="miss"') == 2 and svg.count('class="met"') == 1  # 0.32 < 0.5, 0.84 < 0.85 <= 0.93


def test_the_checked_in_chart_is_the_one_the_records_draw() -> None:
    records = chart.load()
    assert len(records) >= 50  # the records docs/benchmarks.md once held in prose, and the runs since
    measured = {g.figure for g in report.GOALS if any(g.figure in r.get("figures", {}) for r in records)}
    drawn = (ROOT / "docs" / "benchmarks-goals.svg").read_text()
    assert set(_series(drawn)) == measured
    assert drawn == chart.svg(chart.series(records)), "run python -m bench.chart and commit docs/benchmarks-goals.svg"
    assert "benchmarks-goals.svg" in (ROOT / "docs" / "benchmarks.md").read_text()


def test_every_record_says_when_what_and_how(tmp_path: Path) -> None:
    for record in chart.load():
        assert re.fullmatch(r"20\d\d-\d\d-\d\d", record["date"]), record["_file"]
        assert record["title"] and record["kind"] in {"run", "ab", "measurement", "analysis", "parts"}, record["_file"]
        assert isinstance(record.get("figures"), dict), record["_file"]


def test_a_recorded_run_is_read_back(tmp_path: Path) -> None:
    result = {"figures": {"a.rps": 40_000.0, "a.server_cpu": 0.99, "d.ratio": 0.9}, "per_run": [{}], "goals": []}
    path = report.record(result, "scripts/bench --only a,d --runs 1", quick=False, results=tmp_path)
    report.record(result, "scripts/bench --quick", quick=True, results=tmp_path)
    (record,) = [r for r in chart.load(tmp_path) if not r["quick"]]
    assert record["_file"] == path.name and record["command"] == "scripts/bench --only a,d --runs 1"
    assert record["hello_world"] == {"us": 24.75} and record["figures"]["d.ratio"] == 0.9
    assert _series(chart.svg(chart.series(chart.load(tmp_path)))) == {"d.ratio": 1}
