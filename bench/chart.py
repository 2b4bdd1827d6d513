"""Each goal's figure across the recorded runs, as one SVG: ``python -m bench.chart``.

The runs are the JSON records in ``bench/results/`` (``report.record`` appends one after
each run of ``scripts/bench``). A record's ``figures`` hold the bench's figure names
(``b000.ratio_a``, ``cap_full.total_hw_per_stored``, ...); every goal of ``report.GOALS``
that some record measured gets a panel: its figure run by run, oldest first, with the
goal's line dashed. Pure Python, no dependency: the SVG is written as text."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from bench.report import GOALS, Goal

RESULTS = Path(__file__).resolve().parent / "results"
CHART = Path(__file__).resolve().parent.parent / "docs" / "benchmarks-goals.svg"

# a record's time of day where it names one, for the order of one day's records
_WHEN = {"morning": 1, "second morning": 2, "afternoon": 3, "evening": 4, "night": 5}
_COLUMNS = 2
_PANEL_W, _PANEL_H = 460, 170
_PAD_L, _PAD_R, _PAD_T, _PAD_B = 44, 12, 34, 26


@dataclass(frozen=True, slots=True)
class Point:
    record: str  # the record's file name
    title: str
    date: str
    value: float


def load(results: Path = RESULTS) -> list[dict[str, Any]]:
    """Every record in ``results``, oldest first: by date, then by the measured tree's
    commit time or the time of day the record names."""
    records = []
    for path in sorted(results.glob("*.json")):
        record = json.loads(path.read_text())
        record["_file"] = path.name
        records.append(record)

    def key(r: dict[str, Any]) -> tuple[str, str, int, str]:
        when = _WHEN.get(r.get("when") or "", 0)
        return (str(r.get("date") or ""), str(r.get("committed_at") or ""), when, r["_file"])

    return sorted(records, key=key)


def series(records: list[dict[str, Any]], goals: tuple[Goal, ...] = GOALS) -> dict[str, list[Point]]:
    """Each goal's figure, by goal figure name, over the records that measured it (quick
    runs left out: they measure nothing)."""
    out: dict[str, list[Point]] = {}
    for goal in goals:
        points = [
            Point(
                record=r["_file"],
                title=str(r.get("title", r["_file"])),
                date=str(r.get("date") or ""),
                value=float(r["figures"][goal.figure]),
            )
            for r in records
            if not r.get("quick") and isinstance(r.get("figures", {}).get(goal.figure), int | float)
        ]
        if points:
            out[goal.figure] = points
    return out


def _num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _panel(goal: Goal, points: list[Point], x0: float, y0: float) -> list[str]:
    values = [p.value for p in points]
    lo, hi = min(*values, goal.target), max(*values, goal.target)
    if lo == hi:
        lo, hi = lo - 1, hi + 1
    margin = (hi - lo) * 0.08
    lo, hi = (0.0 if lo >= 0 and lo - margin < 0 else lo - margin), hi + margin
    w, h = _PANEL_W - _PAD_L - _PAD_R, _PANEL_H - _PAD_T - _PAD_B
    left, top = x0 + _PAD_L, y0 + _PAD_T

    def x(i: int) -> float:
        return left + (w / 2 if len(points) == 1 else w * i / (len(points) - 1))

    def y(v: float) -> float:
        return top + h - (v - lo) / (hi - lo) * h

    met = [goal.met(p.value) for p in points]
    out = [
        f'<g class="panel" data-goal="{escape(goal.figure)}">',
        f'<text x="{x0 + 6}" y="{y0 + 14}" class="title">{escape(goal.label)}</text>',
        f'<text x="{x0 + 6}" y="{y0 + 27}" class="sub">goal {escape(goal.op)} {_num(goal.target)};'
        f" latest {_num(values[-1])} ({'met' if met[-1] else 'not met'})</text>",
        f'<rect x="{left}" y="{top}" width="{w}" height="{h}" class="frame"/>',
        f'<line x1="{left}" x2="{left + w}" y1="{y(goal.target):.1f}" y2="{y(goal.target):.1f}" class="goal"/>',
        f'<text x="{left - 4}" y="{top + 4}" class="axis" text-anchor="end">{_num(hi)}</text>',
        f'<text x="{left - 4}" y="{top + h}" class="axis" text-anchor="end">{_num(lo)}</text>',
        f'<text x="{left}" y="{top + h + 14}" class="axis">{escape(points[0].date)}</text>',
        f'<text x="{left + w}" y="{top + h + 14}" class="axis" text-anchor="end">{escape(points[-1].date)}</text>',
    ]
    path = " ".join(f"{x(i):.1f},{y(p.value):.1f}" for i, p in enumerate(points))
    out.append(f'<g class="series" data-goal="{escape(goal.figure)}" data-points="{len(points)}">')
    out.append(f'<polyline points="{path}" class="line"/>')
    for i, (p, ok) in enumerate(zip(points, met, strict=True)):
        tip = escape(f"{p.date} {p.title}: {_num(p.value)} ({p.record})")
        kind = "met" if ok else "miss"
        out.append(f'<circle cx="{x(i):.1f}" cy="{y(p.value):.1f}" r="3" class="{kind}"><title>{tip}</title></circle>')
    out += ["</g>", "</g>"]
    return out


def svg(data: dict[str, list[Point]], goals: tuple[Goal, ...] = GOALS) -> str:
    """The chart: a panel per goal in ``data``, in the order of ``goals``."""
    shown = [g for g in goals if g.figure in data]
    rows = max(1, -(-len(shown) // _COLUMNS))
    width, height = _COLUMNS * _PANEL_W, rows * _PANEL_H + 30
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}"'
        ' font-family="sans-serif">',
        "<style>.title{font-size:10px;font-weight:bold}.sub,.axis{font-size:9px;fill:#555}"
        ".frame{fill:#fafafa;stroke:#ccc}.goal{stroke:#c33;stroke-dasharray:4 3}"
        ".line{fill:none;stroke:#36c;stroke-width:1.5}.met{fill:#2a2}.miss{fill:#c33}</style>",
        f'<text x="6" y="18" class="title">Each goal across the recorded runs (bench/results/, oldest first):'
        f" {len(shown)} goals; dashed: the goal; green: met, red: not met</text>",
    ]
    for n, goal in enumerate(shown):
        out += _panel(goal, data[goal.figure], (n % _COLUMNS) * _PANEL_W, 30 + (n // _COLUMNS) * _PANEL_H)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write(results: Path = RESULTS, out: Path = CHART) -> Path:
    out.write_text(svg(series(load(results))))
    return out


def main(argv: list[str]) -> None:
    """``python -m bench.chart [RESULTS_DIR [OUT.svg]]``"""
    results = Path(argv[0]) if argv else RESULTS
    out = Path(argv[1]) if len(argv) > 1 else CHART
    print(write(results, out))


if __name__ == "__main__":
    main(sys.argv[1:])
