"""What ships for deploying: compose.yaml, the Dockerfile, and deploy/ (Prometheus alert
rules and scrape config, the Grafana dashboard).

compose.yaml is validated against the Compose Specification's JSON schema (vendored in
tests/data, see its README); the alert rules with promtool (Debian's prometheus package;
scripts/test fetches it when missing; skipped where it cannot be had, except under CI=true);
and every refstream_* metric a rule or a panel names must be one the edge or a worker
exports. No Docker engine is needed: nothing here builds the image.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from ingest.edge.metrics import EdgeMetrics
from workers.consumer.metrics import WorkerMetrics

# the same in either pass (no server-specific behaviour): scripts/test runs it in the first only
pytestmark = pytest.mark.once

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "refstream-rules.yml"
DASHBOARD = DEPLOY / "grafana" / "refstream.json"
REFSTREAM_SERVICES = {"migrate", "edge", "worker", "archive", "console"}


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return doc


# -- compose.yaml --------------------------------------------------------------------------

_VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\})")


def _interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation (${VAR}, ${VAR:-default}, ${VAR-default}, $$), then its
    casting: a value that was a single variable and reads as an integer becomes one."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, default = m.group(1), m.group(2), m.group(3)
        if name in env and (env[name] or op != ":-"):
            return env[name]
        return default if op else ""

    out = _VAR.sub(one, value)
    whole = _VAR.fullmatch(value)
    return int(out) if whole and whole.group(1) and out.isdigit() else out


def _compose_validator() -> jsonschema.protocols.Validator:
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    validator: jsonschema.protocols.Validator = jsonschema.Draft201909Validator(schema)
    return validator


def test_compose_yaml_matches_the_compose_specification() -> None:
    validator = _compose_validator()
    doc = _interpolate(_compose(), {})
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    assert errors == []
    # and the schema is strict enough to catch a slip
    doc["services"]["edge"]["restart_policy"] = "always"
    doc["services"]["worker"]["depends_on"]["migrate"]["condition"] = "completed"
    assert len(list(validator.iter_errors(doc))) == 2


def test_one_image_built_once_and_run_by_every_refstream_service() -> None:
    services = _compose()["services"]
    using = {name for name, s in services.items() if s.get("image") == "refstream:local"}
    assert using == REFSTREAM_SERVICES
    built = [name for name, s in services.items() if "build" in s]
    assert built == ["migrate"]
    for name in REFSTREAM_SERVICES - {"migrate"}:
        assert services[name]["pull_policy"] == "never", name  # never pulled: migrate builds it


def test_restart_policies() -> None:
    services = _compose()["services"]
    assert services["migrate"]["restart"] == "on-failure"
    for name, s in services.items():
        if name != "migrate":
            assert s.get("restart") == "unless-stopped", name


def test_postgres_is_healthy_only_once_it_answers_over_tcp() -> None:
    check = _compose()["services"]["postgres"]["healthcheck"]["test"]
    assert check[:2] == ["CMD", "pg_isready"]
    args = check[2:]
    assert args[args.index("-h") + 1] == "127.0.0.1"
    assert args[args.index("-U") + 1] == "refstream" and args[args.index("-d") + 1] == "refstream"


def test_edge_and_workers_start_after_a_migration_that_retries() -> None:
    services = _compose()["services"]
    for name in ("edge", "worker"):
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}, name
        assert services[name]["depends_on"]["redis"] == {"condition": "service_healthy"}, name
    migrate = services["migrate"]
    assert migrate["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert migrate["entrypoint"] == ["sh", "-c"]  # its own retries: the next test runs them


def test_the_migrate_script_retries_until_migrate_succeeds(tmp_path: Path) -> None:
    script = _interpolate(_compose()["services"]["migrate"]["command"][0], {})
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "refstream").write_text(
        f'#!/bin/sh\necho x >> {tmp_path}/calls\n[ "$(wc -l < {tmp_path}/calls)" -ge 3 ]\n'
    )  # fails twice, then succeeds
    (bin_ / "refstream").chmod(0o755)
    (bin_ / "sleep").write_text("#!/bin/sh\n")  # no need to wait here
    (bin_ / "sleep").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}"}
    run = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "calls").read_text().count("x") == 3
    # and gives up, failing, when it never succeeds
    (bin_ / "refstream").write_text(f"#!/bin/sh\necho x >> {tmp_path}/never\nexit 1\n")
    run = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode != 0
    assert (tmp_path / "never").read_text().count("x") == 30


def test_files_compose_mounts_exist() -> None:
    for name, s in _compose()["services"].items():
        for volume in s.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source}"


# -- the Dockerfile ------------------------------------------------------------------------

_ARCH = re.compile(r"amd64|x86_64|arm64|aarch64|--platform", re.IGNORECASE)


def _dockerfile() -> list[str]:
    """Its instructions, comments and continuations joined."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    return [ln.strip() for ln in "\n".join(lines).replace("\\\n", " ").splitlines() if ln.strip()]


def test_the_image_is_the_same_for_amd64_and_arm64() -> None:
    instructions = _dockerfile()
    assert [i for i in instructions if i.startswith("FROM")] == ["FROM python:3.11-slim"]  # multi-arch
    assert [i for i in instructions if _ARCH.search(i)] == []


def test_the_image_installs_refstream_without_extras() -> None:
    installs = [i for i in _dockerfile() if "pip install" in i]
    assert len(installs) == 1
    assert re.search(r"pip install (--no-cache-dir )?\. ", installs[0]), installs[0]
    assert "[" not in installs[0]  # no refstream[embedded]: no embedded servers in the image


def test_what_the_dockerfile_copies_is_in_the_build_context() -> None:
    ignored = [
        ln.strip().rstrip("/")
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    for instruction in _dockerfile():
        if instruction.startswith("COPY"):
            for source in instruction.split()[1:-1]:
                assert (ROOT / source).exists(), source
                assert source not in ignored, source


# -- deploy/: alert rules, scrape config, dashboard ----------------------------------------


def _promtool() -> str:
    found = shutil.which("promtool") or str(Path(sys.executable).parent / "promtool")
    if not os.access(found, os.X_OK):
        reason = "promtool not found (Debian's prometheus package; scripts/test fetches it into .venv/bin)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


@pytest.mark.parametrize(
    "args",
    [
        ["check", "rules", "refstream-rules.yml"],
        ["test", "rules", "refstream-rules.test.yml"],
        ["check", "config", "prometheus.yml"],
    ],
    ids=["check-rules", "test-rules", "check-config"],
)
def test_promtool(args: list[str]) -> None:
    run = subprocess.run([_promtool(), *args], cwd=DEPLOY / "prometheus", capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def _rule_exprs() -> list[str]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule["expr"] for group in doc["groups"] for rule in group["rules"]]


def _panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels += [panel, *panel.get("panels", [])]
    return panels


def _exported() -> tuple[set[str], set[str]]:
    """(every series name the edge and a worker expose, their metric family names)."""
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_count", "_sum", "_created"]}
    series: set[str] = set()
    families: set[str] = set()
    for registry in (EdgeMetrics().registry, WorkerMetrics().registry):
        for family in registry.collect():
            families.add(family.name)
            series.update(family.name + s for s in suffixes.get(family.type, [""]))
    return series, families


_METRIC = re.compile(r"\brefstream_[a-z0-9_]+")


def test_every_refstream_metric_a_rule_or_panel_names_is_exported() -> None:
    series, families = _exported()
    assert {"refstream_worker_blocked", "refstream_http_requests_total", "refstream_batch_seconds_bucket"} <= series
    queried = {m for e in _rule_exprs() for m in _METRIC.findall(e)}
    queried |= {m for p in _panels() for t in p.get("targets", []) for m in _METRIC.findall(t["expr"])}
    assert queried, "no refstream_* metric found in the rules and the dashboard"
    assert sorted(queried - series) == []
    # annotations and panel descriptions may name a family as well as a series (the rules'
    # comments name metrics that do not exist yet, on purpose: they are not looked at)
    rules = json.dumps(yaml.safe_load(RULES.read_text()))
    mentioned = set(_METRIC.findall(rules)) | set(_METRIC.findall(DASHBOARD.read_text()))
    assert sorted(mentioned - series - families) == []


def test_the_dashboard_shows_what_an_operator_asks_first() -> None:
    exprs = " ".join(t["expr"] for p in _panels() for t in p.get("targets", []))
    for metric in (
        "refstream_http_requests_total",
        "refstream_spool_bytes",
        "refstream_events_processed_total",
        "refstream_batch_seconds_bucket",
        "refstream_stream_lag",
        "refstream_stream_pending",
        "refstream_worker_blocked",
    ):
        assert metric in exprs, metric
    panels = [p for p in _panels() if p["type"] != "row"]
    assert len({p["id"] for p in _panels()}) == len(_panels())
    for p in panels:
        assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24, p["title"]


def test_the_alert_rules_cover_what_breaks() -> None:
    alerts = {
        rule["alert"]: rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    }
    needs = {
        "refstream_stream_lag": "lag",
        'outcome="dead"': "dead letters",
        "refstream_spool_bytes": "the edge's spool",
        "refstream_worker_blocked": "a blocked worker",
        "redis_memory_used_bytes / (redis_memory_max_bytes > 0)": "Redis memory headroom",
    }
    for needle, what in needs.items():
        assert any(needle in expr for expr in alerts.values()), what
