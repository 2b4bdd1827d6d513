"""The settings object fails fast on what would misbehave later."""

from __future__ import annotations

import re
from ipaddress import ip_network

import pytest
from pydantic import AliasChoices, ValidationError

from ingest.contract.settings import Settings, env_var


def test_block_time_must_stay_below_the_socket_timeout():
    with pytest.raises(ValidationError, match="block_ms"):
        Settings(block_ms=5000, redis_socket_timeout_s=5.0)
    assert Settings(block_ms=4999, redis_socket_timeout_s=5.0).block_ms == 4999


# issue 38: each setting's unit in its name; (setting, a former name, a value, a new value)
RENAMED = [
    ("redis_socket_timeout_s", "REFSTREAM_REDIS_SOCKET_TIMEOUT", "7", "8"),
    ("click_rate_limit_per_min", "REFSTREAM_CLICK_RATE_LIMIT", "61", "62"),
    ("public_rate_limit_per_min", "REFSTREAM_PUBLIC_RATE_LIMIT", "601", "602"),
    ("key_rate_limit_per_min", "REFSTREAM_KEY_RATE_LIMIT", "603", "604"),
    ("stream_retention_s", "REFSTREAM_STREAM_RETENTION", "120", "240"),
    ("stream_retention_s", "REFSTREAM_RETENTION_S", "360", "480"),
    ("event_retention_days", "REFSTREAM_EVENT_RETENTION", "10", "20"),
    ("dedupe_retention_days", "REFSTREAM_DEDUPE_RETENTION", "500", "600"),
    ("webhook_retention_days", "REFSTREAM_WEBHOOK_RETENTION", "31", "32"),
]


@pytest.mark.parametrize(("field", "former", "old", "new"), RENAMED)
def test_a_former_name_still_sets_its_setting_and_the_new_name_wins(monkeypatch, field, former, old, new):
    monkeypatch.setenv(former, old)
    assert getattr(Settings(), field) == float(old)
    monkeypatch.setenv(f"REFSTREAM_{field.upper()}", new)
    assert getattr(Settings(), field) == float(new)
    monkeypatch.delenv(former)
    assert getattr(Settings(), field) == float(new)
    # errors name the new variable; in code the setting is set by its own name
    assert env_var(field) == f"REFSTREAM_{field.upper()}"
    assert getattr(Settings(**{field: new}), field) == float(new)


def test_every_former_name_is_in_the_configuration_doc() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    table = doc[doc.index("## Former names") :]
    former = {
        str(name)
        for field in Settings.model_fields.values()
        if isinstance(field.validation_alias, AliasChoices)
        for name in field.validation_alias.choices[1:]
        if str(name).startswith("REFSTREAM_")
    }
    assert former == {r[1] for r in RENAMED}
    assert [f for f in sorted(former) if f"`{f}`" not in table] == []


@pytest.mark.parametrize("prefix", ["a{b}", "", "x" * 65, "sp ace"])
def test_a_prefix_cannot_change_hash_tags(prefix):
    with pytest.raises(ValidationError):
        Settings(stream_prefix=prefix)


def test_environment_names(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://r:1/2")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@h/db")
    monkeypatch.setenv("REFSTREAM_TRUSTED_PROXIES", "10.0.0.0/8, 2001:db8::/32")
    monkeypatch.setenv("REFSTREAM_PARTITIONS", "8")
    s = Settings()
    assert (s.redis_url, s.database_url, s.partitions) == ("redis://r:1/2", "postgresql://u@h/db", 8)
    assert s.trusted_proxies == [ip_network("10.0.0.0/8"), ip_network("2001:db8::/32")]
    assert s.arq_url == "redis://r:1/2"  # arq's queue defaults to the same Redis
    monkeypatch.setenv("REFSTREAM_ARQ_REDIS_URL", "redis://plain:6379/0")
    assert Settings().arq_url == "redis://plain:6379/0"


def test_every_setting_is_in_the_configuration_doc() -> None:
    """docs/configuration.md names every variable the settings read, and nothing that
    refstream no longer reads: each REFSTREAM_* it names is a setting, or is read by the code,
    the scripts or the tests."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    doc = (root / "docs" / "configuration.md").read_text()
    aliases = {"redis_url": "REDIS_URL", "database_url": "DATABASE_URL"}
    missing = [
        env
        for name in Settings.model_fields
        if f"`{(env := aliases.get(name, 'REFSTREAM_' + name.upper()))}`" not in doc and f"{env}`" not in doc
    ]
    assert missing == []
    read = {f"REFSTREAM_{name.upper()}" for name in Settings.model_fields}
    code = "".join(
        p.read_text()
        for d in ("ingest", "workers", "refstream", "scripts", "tests")
        for p in (root / d).rglob("*")
        if p.is_file() and (p.suffix == ".py" or d == "scripts")
    )
    stale = sorted({v for v in re.findall(r"REFSTREAM_[A-Z0-9_]+", doc) if v not in read and v not in code})
    assert stale == []


def test_the_configuration_doc_states_each_default() -> None:
    """Each default in docs/configuration.md is the one the settings have (a setting
    without one, such as REFSTREAM_CITY_DB, says what stands in for it instead)."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 3 and cells[0].startswith("`"):
            names, defaults = re.findall(r"`([A-Z0-9_]+)`", cells[0]), cells[1].split(" / ")
            if len(defaults) != len(names):
                defaults = [cells[1]] * len(names)
            for name, default in zip(names, defaults, strict=True):
                rows[name] = default
    wrong = []
    for name, field in Settings.model_fields.items():
        var = env_var(name)
        code = field.get_default(call_default_factory=True)
        said = re.sub(r"^`([^`]*)`.*$", r"\1", rows[var])
        if code in (None, []):
            continue  # "(none)", "(AWS)", "`REDIS_URL`": what stands in for a missing value
        if isinstance(code, bool):
            ok = said == str(code).lower()
        elif isinstance(code, int | float):
            ok = said.replace(".", "", 1).isdigit() and float(said) == float(code)
        else:
            ok = said == code
        if not ok:
            wrong.append(f"{var}: the doc says {rows[var]}, the code {code!r}")
    assert wrong == []
