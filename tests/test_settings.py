"""The settings object fails fast on what would misbehave later."""

from __future__ import annotations

from ipaddress import ip_network

import pytest
from pydantic import ValidationError

from ingest.settings import Settings


def test_block_time_must_stay_below_the_socket_timeout():
    with pytest.raises(ValidationError, match="block_ms"):
        Settings(block_ms=5000, redis_socket_timeout=5.0)
    assert Settings(block_ms=4999, redis_socket_timeout=5.0).block_ms == 4999


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


def test_every_setting_is_in_the_readme() -> None:
    """The README's configuration table names every variable the settings read."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    aliases = {"redis_url": "REDIS_URL", "database_url": "DATABASE_URL"}
    missing = [
        env
        for name in Settings.model_fields
        if f"`{(env := aliases.get(name, 'REFSTREAM_' + name.upper()))}`" not in readme and f"{env}`" not in readme
    ]
    assert missing == []
