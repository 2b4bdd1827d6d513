"""`refstream bench` end to end, in miniature: the bare aiohttp baseline and the seed 000
route, one run of one second each, as JSON with every figure positive."""

from __future__ import annotations

import os
import shutil
import subprocess

import orjson
import pytest

from ._procs import REFSTREAM

# the same in either pass (no server-specific behaviour): scripts/test runs it in the first only
pytestmark = pytest.mark.once


@pytest.mark.timeout(120)
def test_bench_quick_prints_positive_figures_as_json():
    # the bench installs wrk itself where it can (root, apt-get); elsewhere, outside CI, say so and skip
    if (
        shutil.which("wrk") is None
        and os.environ.get("CI") != "true"
        and (os.geteuid() != 0 or not shutil.which("apt-get"))
    ):
        print("\nSKIPPING the bench smoke test: wrk is missing and cannot be installed here")
        pytest.skip("wrk is missing and cannot be installed here (apt-get install -y wrk)")
    out = subprocess.run(
        [REFSTREAM, "bench", "--quick", "--runs", "1", "--json", "--only", "a,b000", "--duration", "1"],
        capture_output=True,
        timeout=110,
        check=False,
    )
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    result = orjson.loads(out.stdout)
    figures = result["figures"]
    for key in ("a.rps", "a.p50_ms", "a.p99_ms", "b000.rps", "b000.p50_ms", "b000.p99_ms", "b000.ratio_a",
                "g.edge_rss_mb"):  # fmt: skip
        assert figures[key] > 0, key
    assert figures["b000.errors"] == 0
    assert result["runs"] == 1 and result["machine"]["nproc"] >= 1
    assert any(g["figure"] == "b000.ratio_a" and g["met"] is not None for g in result["goals"])
